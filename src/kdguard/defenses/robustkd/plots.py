"""Pictures of a detoxification: mask values per stage and channel, and a trigger preview."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .detox import FeatureDetox  # noqa: E402
from .stats import StageStats, normalized_variance  # noqa: E402


def plot_masks(path: str | Path, detox: FeatureDetox, stats: Mapping[str, StageStats] | None = None) -> Path:
    """One panel per detoxified stage: the mask value of every channel (bars, left axis).

    Element masks (``C×H×W``) are shown as their per-channel mean, with the per-channel maximum
    as a tick. If ``stats`` are given, the channel's relative clean variance ``v̂`` (mean 1 per
    stage; right axis, log scale) is overlaid as dots, which shows whether the masked channels
    are the dormant ones. Returns the PNG path.
    """
    path = Path(path)
    masks = detox.masks()
    fig, axes = plt.subplots(len(masks), 1, figsize=(10, 2.4 * len(masks)), squeeze=False)
    for ax, (stage, m) in zip(axes[:, 0], masks.items()):
        mean = m.mean((1, 2)).numpy()
        x = range(len(mean))
        ax.bar(x, mean, width=1.0, color="tab:red", alpha=0.75, label="mask M (channel mean)")
        if m.shape[1] * m.shape[2] > 1:
            ax.plot(x, m.amax((1, 2)).numpy(), "_", color="k", markersize=4, label="max over positions")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(-0.5, len(mean) - 0.5)
        ax.set_ylabel("M")
        ax.set_title(f"{stage}: {float((m > 0.5).float().mean()) * 100:.1f} % of units masked (M > 0.5)",
                     fontsize=9)
        if stats is not None and stage in stats:
            v = normalized_variance(stats[stage], "channel").flatten().clamp_min(1e-6).numpy()
            twin = ax.twinx()
            twin.semilogy(list(x), v, ".", color="tab:blue", markersize=3, label="relative clean variance")
            twin.set_ylabel("Var / stage mean", color="tab:blue")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("channel")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trigger(path: str | Path, trigger, sample: torch.Tensor) -> Path:
    """Pattern ``P``, blend mask ``M`` and up to 6 triggered samples of a :class:`RobustKDBlend`."""
    path = Path(path)
    sample = sample[:6]
    triggered = trigger(sample)
    fig, axes = plt.subplots(1, 2 + len(sample), figsize=(1.6 * (2 + len(sample)), 1.9))

    def show(ax, img, title, **kw):
        img = img.permute(1, 2, 0).numpy() if img.dim() == 3 else img.numpy()
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
            kw.setdefault("cmap", "gray")
        ax.imshow(img, **kw)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])

    show(axes[0], trigger.pattern, "pattern P", vmin=0, vmax=1)
    show(axes[1], trigger.blend_mask, f"mask M (max {float(trigger.blend_mask.max()):.2f})",
         cmap="magma", vmin=0, vmax=trigger.max_mask)
    for i in range(len(sample)):
        show(axes[2 + i], triggered[i].float() / 255 if triggered.dtype == torch.uint8 else triggered[i],
             "triggered", vmin=0, vmax=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
