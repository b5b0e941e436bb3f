"""Markdown reports, result tables and PNG plots for run directories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .data.dataset import ImageDataset  # noqa: E402
from .io import write_text  # noqa: E402
from .metrics import at_chance  # noqa: E402

Row = tuple[str, str, dict[str, Any]]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def collapsed(metrics: dict[str, Any], num_classes: int | None = None) -> bool:
    """Whether a row's model ended at chance accuracy: its ``collapsed`` flag, else
    :func:`kdguard.metrics.at_chance` of its CA when ``num_classes`` is given."""
    flag = metrics.get("collapsed")
    if flag is None and num_classes:
        flag = at_chance(metrics.get("ca"), num_classes)
    return bool(flag)


def metrics_table(rows: Sequence[Row], num_classes: int | None = None) -> str:
    """A Markdown table with CA, ASR, ASR-all, RA and the target-class CA (in %) and the ASR
    denominator; the CA of a model at chance level (:func:`collapsed`) reads ``12.30 (chance)``."""
    lines = ["| role | model | CA % | ASR % | ASR-all % | RA % | target-class CA % | n_clean | n_backdoor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for role, arch, m in rows:
        ca = _pct(m.get("ca")) + (" (chance)" if collapsed(m, num_classes) else "")
        lines.append(f"| {role} | {arch} | {ca} | {_pct(m.get('asr'))} | "
                     f"{_pct(m.get('asr_all'))} | {_pct(m.get('ra'))} | {_pct(m.get('target_ca'))} | "
                     f"{m.get('n_clean', '—')} | {m.get('n_backdoor', '—')} |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG (120 dpi) and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_trigger_preview(path: Path, sample: ImageDataset, trigger, n: int = 8) -> Path:
    """Clean images (top row) and their triggered copies (bottom row) as one PNG."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(sample), generator=gen)[:n]
    clean = sample.images[idx]
    triggered = trigger(clean)
    fig, axes = plt.subplots(2, len(idx), figsize=(1.3 * len(idx), 2.8))
    for row, batch, label in ((0, clean, "clean"), (1, triggered, "triggered")):
        for col in range(len(idx)):
            ax = axes[row, col] if len(idx) > 1 else axes[row]
            img = batch[col].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
    return save_figure(fig, path)


def plot_curves(path: Path, histories: dict[str, list]) -> Path:
    """Per-epoch loss terms and validation CA/ASR for each stage (teacher, student, ...)."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage, hist in histories.items():
        epochs = [r.epoch for r in hist]
        for term in sorted({k for r in hist for k in r.losses}):
            ax_loss.plot(epochs, [r.losses.get(term, float("nan")) for r in hist], label=f"{stage}: {term}")
        for key, style in (("val_ca", "-"), ("val_asr", "--")):
            vals = [r.val.get(key) for r in hist]
            if any(v is not None for v in vals):
                ax_val.plot(epochs, [100 * v if v is not None else float("nan") for v in vals], style,
                            label=f"{stage}: {key.replace('val_', 'val ').upper()}")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("% (validation split)")
    ax_val.set_ylim(-2, 102)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_run_report(out: Path, *, title: str, rows: Sequence[Row], history: dict[str, list],
                     attack=None, sample: ImageDataset | None = None, notes: str = "") -> Path:
    """Write ``report.md`` (+ ``trigger_preview.png``, ``curves.png``) into run directory ``out``.

    A row whose model ended at chance accuracy (:func:`collapsed`; ``K`` from ``sample`` for rows
    without the flag) is marked in the table and named in a warning line under it.
    """
    out = Path(out)
    k = sample.num_classes if sample is not None else None
    parts = [f"# {title}", "", metrics_table(rows, k), "",
             "CA: clean test accuracy. ASR: triggered test images of non-target classes classified as "
             "the target. ASR-all: the same over all test images. RA: triggered non-target images "
             "still classified as their true class. Target-class CA: clean accuracy on the target "
             "class's own images (a model that stops predicting the target scores ASR 0 without "
             "unlearning the trigger). Last-epoch model; the test split was not used for any "
             "selection.", ""]
    down = [f"{role} ({_pct(m.get('ca'))} %)" for role, _, m in rows if collapsed(m, k)]
    if down:
        kk = k or next((m.get("num_classes") for _, _, m in rows if m.get("num_classes")), None)
        chance = f" (chance: {100 / kk:.1f} % for {kk} classes)" if kk else ""
        parts += [f"**Collapsed to chance accuracy{chance}: {', '.join(down)}.** Training did not learn "
                  "(a learning rate too high is the usual cause); such a model's ASR and RA say nothing "
                  "about a backdoor.", ""]
    if attack is not None and sample is not None:
        plot_trigger_preview(out / "trigger_preview.png", sample, attack.trigger)
        params = attack.trigger.params()
        how = (f"{attack.label_mode}, {attack.poisoning}, poison rate {attack.poison_rate}"
               if attack.poison_rate is not None  # an imported teacher: its poisoning is not known
               else "the trigger evaluated; how the teacher was poisoned is unknown")
        parts += ["## Attack", "", f"Trigger `{params.get('name')}`, target class {attack.target}, {how}.", "",
                  "![trigger preview](trigger_preview.png)", ""]
    if any(history.values()):
        plot_curves(out / "curves.png", history)
        parts += ["## Training curves", "", "![training curves](curves.png)", ""]
    if notes:
        parts += [notes, ""]
    return write_text(out / "report.md", "\n".join(parts))
