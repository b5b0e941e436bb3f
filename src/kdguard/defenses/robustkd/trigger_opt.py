"""RobustKD's optimised blended trigger ("Ours" attack of the reference's ``create_patch.py``).

A full-image pattern ``P ∈ [0, 1]^{C×H×W}`` is blended in with a per-pixel mask
``M ∈ [0, m_max]^{H×W}`` (``m_max = 0.2``): ``x' = (1 − M) ⊙ x + M ⊙ P``. Both are learned on a
**clean** model so that triggered images drive the most-activated channels of every stage to
the stage's largest channel mean (a TrojanNN-style neuron hijacking, Liu et al. NDSS 2018):

    min_{P,M} Σ_l (1/|S_l|) Σ_{c∈S_l} mean_{n,h,w} (F_{l,c}(x') − μ_l^max)² / (μ_l^max)²

* ``S_l``: the top ``top_fraction`` (10 %) channels of stage ``l`` by mean activation on the
  triggered images at initialisation, over ``selection_images`` images (the reference picks them
  on its first batch only);
* ``μ_l^max``: the largest channel mean of stage ``l`` on the same images;
* the division by ``(μ_l^max)²`` (``normalize_stages=True``) is kdguard's: it keeps deep stages
  with large activations from drowning the others; ``False`` gives the reference's raw squares.

Reference settings: Adam lr 0.005, 200 epochs, batch 64. Bugs of the reference fixed here: its
loss used only image 0 of each batch and, being reassigned rather than accumulated, only the
last stage; and ``mask = clamp(mask, 0, 0.2)`` rebinds the mask outside autograd, so after the
first step only ``P`` was learned. Here both are reparametrised, ``P = sigmoid(A)`` and
``M = m_max · sigmoid(B)``, so they stay in range and both receive gradients.

The learned trigger is a :class:`RobustKDBlend` (registered as ``"robustkd_blend"``), usable by
every attack function of kdguard; :meth:`RobustKDBlend.save` writes it to a safetensors file that
``build_trigger("robustkd_blend", shape, file=...)`` (or ``attack.params.file=...`` in a job
config) reads back, and ``params()`` embeds its values so run manifests rebuild it exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ...attacks.triggers.base import TRIGGERS, Trigger, register_trigger
from ...attacks.triggers.validate import as_float
from ...data.batches import to_float
from ...errors import KDGuardError, check_range
from ...io import atomic_write
from ...log import bar_disabled
from ...models.stages import stage_paths
from ...taps import FeatureTaps

TRIGGER_FORMAT = "kdguard.robustkd.trigger/1"
MAX_MASK = 0.2  # reference create_patch.py: mask clamped to [0, 0.2]


def _as_image_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float32).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError):
        raise KDGuardError(f"robustkd_blend {what} of type {type(value).__name__} is not numeric",
                           "give a tensor or nested list of floats") from None
    if not torch.isfinite(t).all():
        raise KDGuardError(f"robustkd_blend {what} has non-finite values", "give finite floats")
    return t


class RobustKDBlend(Trigger):
    """Blend ``x' = (1 − M) ⊙ x + M ⊙ P`` with a learned pattern and per-pixel mask.

    Args:
        image_shape: ``(C, H, W)``.
        seed: seeds the default (un-optimised) pattern.
        file: a safetensors file written by :meth:`save` (holds ``pattern`` and ``mask``).
        pattern: ``C×H×W`` floats in [0, 1] (a tensor or nested lists).
        mask: ``H×W`` (or ``1×H×W``) floats in [0, max_mask].
        max_mask: the largest allowed mask value (0.2, reference).

    Without ``file``/``pattern``/``mask`` the trigger is a seeded uniform random pattern with a
    constant mask ``max_mask/2``, i.e. :func:`optimize_blend_trigger`'s starting point.

    Raises:
        KDGuardError: both ``file`` and tensors given, only one of ``pattern``/``mask``, an
            unreadable file, wrong shapes, or values out of range.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *, file: str | Path | None = None,
                 pattern: Any = None, mask: Any = None, max_mask: float = MAX_MASK) -> None:
        super().__init__(image_shape, seed)
        self.max_mask = as_float(self.name, "max_mask", max_mask, 0.0, 1.0, low_open=True)
        if file is not None and (pattern is not None or mask is not None):
            raise KDGuardError("robustkd_blend got both a file and pattern/mask values",
                               "give either attack.params.file=... or attack.params.pattern=... and "
                               "attack.params.mask=...")
        if (pattern is None) != (mask is None):
            raise KDGuardError("robustkd_blend needs both pattern and mask (or neither)",
                               "give both, or load them with attack.params.file=...")
        if file is not None:
            pattern, mask = self._read(Path(file))
        elif pattern is None:
            pattern = torch.rand(self.image_shape, generator=self._generator())
            mask = torch.full(self.image_shape[1:], self.max_mask / 2)
        self._pattern, self._mask = self._check(_as_image_tensor(pattern, "pattern"), _as_image_tensor(mask, "mask"))

    def _check(self, pattern: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(pattern.shape) != self.image_shape:
            raise KDGuardError(f"robustkd_blend pattern has shape {tuple(pattern.shape)}, expected "
                               f"{self.image_shape}", "give a C×H×W pattern for this image shape")
        if mask.dim() == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if tuple(mask.shape) != self.image_shape[1:]:
            raise KDGuardError(f"robustkd_blend mask has shape {tuple(mask.shape)}, expected "
                               f"{self.image_shape[1:]}", "give an H×W mask")
        if float(pattern.min()) < 0 or float(pattern.max()) > 1:
            raise KDGuardError("robustkd_blend pattern values lie outside [0, 1]", "give values in [0, 1]")
        if float(mask.min()) < 0 or float(mask.max()) > self.max_mask + 1e-6:
            raise KDGuardError(f"robustkd_blend mask values lie outside [0, {self.max_mask}]",
                               f"give values in [0, {self.max_mask}] or raise max_mask")
        return pattern, mask.clamp(0, self.max_mask)

    def _read(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        if not path.is_file():
            raise KDGuardError(f"robustkd_blend trigger file {str(path)!r} does not exist",
                               "give the trigger.safetensors written by `kdguard robustkd-trigger`")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise KDGuardError(f"cannot read trigger file {str(path)!r} ({e})",
                               "give a file written by RobustKDBlend.save") from None
        if "pattern" not in tensors or "mask" not in tensors:
            raise KDGuardError(f"trigger file {str(path)!r} lacks 'pattern' or 'mask'",
                               "give a file written by RobustKDBlend.save")
        return tensors["pattern"], tensors["mask"]

    @property
    def pattern(self) -> torch.Tensor:
        """``float32`` ``C×H×W`` in [0, 1]: the learned pattern ``P``."""
        return self._pattern.clone()

    @property
    def blend_mask(self) -> torch.Tensor:
        """``float32`` ``H×W`` in [0, max_mask]: the blend weight of each pixel."""
        return self._mask.clone()

    @property
    def mask(self) -> torch.Tensor:
        """``bool`` ``1×H×W``: pixels with a non-zero blend weight."""
        return (self._mask > 0).unsqueeze(0)

    def _param_values(self) -> dict[str, Any]:
        # values embedded, so a run manifest rebuilds the trigger without the file
        return {"file": None, "pattern": self._pattern.tolist(), "mask": self._mask.tolist(),
                "max_mask": self.max_mask}

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        m = self._on("mask", self._mask, x)
        p = self._on("pattern", self._pattern, x)
        return (1.0 - m) * x + m * p

    def save(self, path: str | Path) -> Path:
        """Write ``pattern`` and ``mask`` to a safetensors file (atomically); returns the path."""
        tensors = {"pattern": self._pattern.contiguous(), "mask": self._mask.contiguous()}
        meta = {"format": TRIGGER_FORMAT, "max_mask": repr(self.max_mask),
                "image_shape": ",".join(map(str, self.image_shape))}
        return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


if "robustkd_blend" not in TRIGGERS:  # importing this module twice must not re-register
    register_trigger("robustkd_blend")(RobustKDBlend)
else:  # pragma: no cover - only when the module is reloaded
    RobustKDBlend.name = "robustkd_blend"


@dataclass
class TriggerResult:
    """What :func:`optimize_blend_trigger` produced.

    Attributes:
        trigger: the learned :class:`RobustKDBlend`.
        history: ``{"epoch", "loss", "stages": {path: loss}, "seconds"}`` per epoch, with a first
            entry for epoch 0 (the initial trigger on the selection images).
        channels: ``{path: [channel indices]}`` hijacked in each stage.
        targets: ``{path: μ^max}``.
        seconds: wall time.
    """

    trigger: RobustKDBlend
    history: list[dict] = field(default_factory=list)
    channels: dict[str, list[int]] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def optimize_blend_trigger(model: nn.Module, images: torch.Tensor, *, paths: Sequence[str] | None = None,
                           top_fraction: float = 0.1, max_mask: float = MAX_MASK, epochs: int = 200,
                           batch_size: int = 64, lr: float = 0.005, selection_images: int = 512,
                           normalize_stages: bool = True, device: torch.device | str = "cpu", seed: int = 0,
                           progress: bool = False) -> TriggerResult:
    """Learn a :class:`RobustKDBlend` on a clean ``model`` (equations in the module docstring).

    Args:
        model: a clean classifier (eval mode and frozen during the optimisation; restored after).
        images: ``N×C×H×W`` uint8 clean images (labels are not needed).
        paths: stage module paths (default: the model's ``stages`` preset).
        top_fraction: share of channels per stage to hijack, in (0, 1] (0.1, reference).
        max_mask: ``m_max`` (0.2, reference).
        epochs, batch_size, lr: Adam settings (reference: 200, 64, 0.005).
        selection_images: images used to pick the channels and ``μ^max``.
        normalize_stages: divide each stage's loss by ``(μ_l^max)²`` (see module docstring).
        device, seed, progress: where to run, the RNG seed (initial pattern, batch order), a bar.

    Returns:
        :class:`TriggerResult` (the trigger, per-epoch total and per-stage losses, the chosen
        channels and targets).

    Raises:
        KDGuardError: bad settings or images, unknown paths, non-4-D stage outputs.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise KDGuardError("trigger optimisation needs a non-empty N×C×H×W image tensor",
                           "pass the clean training images")
    check_range("top_fraction", float(top_fraction), 0.0, 1.0, low_open=True)
    check_range("max_mask", float(max_mask), 0.0, 1.0, low_open=True)
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("selection_images", selection_images)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise KDGuardError(f"trigger optimisation {name} {v!r} is not a positive integer", f"set {name} >= 1")
    check_range("trigger learning rate", float(lr), 0.0, 10.0, low_open=True)
    t_start = time.perf_counter()
    device = torch.device(device)
    paths = list(paths) if paths is not None else list(stage_paths(model, "stages"))
    shape = tuple(images.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    init = torch.rand(shape, generator=gen).clamp(0.02, 0.98)
    pattern_logits = torch.logit(init).to(device).requires_grad_(True)
    mask_logits = torch.zeros(shape[1:], device=device, requires_grad=True)  # M = m_max/2 at start

    def blend(x: torch.Tensor) -> torch.Tensor:
        m = max_mask * torch.sigmoid(mask_logits)
        return (1 - m) * x + m * torch.sigmoid(pattern_logits)

    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    history: list[dict[str, float]] = []
    try:
        with FeatureTaps(model, paths) as taps:
            with torch.no_grad():
                sel = to_float(images[:selection_images], device)
                _, feats = taps(blend(sel))
            chosen, targets = {}, {}
            for path, f in feats.items():
                if f.dim() != 4:
                    raise KDGuardError(f"stage {path!r} outputs shape {tuple(f.shape)}, not N×C×H×W",
                                       "choose convolutional stage outputs")
                means = f.float().mean((0, 2, 3))
                k = max(1, int(round(top_fraction * means.numel())))
                chosen[path] = means.topk(k).indices
                targets[path] = means.max()

            def loss_of(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
                _, fs = taps(blend(x))
                total, parts = x.new_zeros(()), {}
                for path in paths:
                    sel_f = fs[path].float()[:, chosen[path]]
                    err = (sel_f - targets[path]).pow(2).mean()
                    if normalize_stages:
                        err = err / (targets[path].pow(2) + 1e-8)
                    total = total + err  # accumulated over stages (the reference kept only the last)
                    parts[path] = float(err.detach())
                return total, parts

            with torch.no_grad():
                loss0, parts0 = loss_of(sel)
                history.append({"epoch": 0, "loss": float(loss0), "stages": parts0})
            optimizer = torch.optim.Adam([pattern_logits, mask_logits], lr=lr)
            n, bs = len(images), min(batch_size, len(images))
            bar = tqdm(range(epochs), desc="trigger", unit="epoch", disable=bar_disabled(progress), dynamic_ncols=True)
            for epoch in bar:
                t0, total, steps = time.perf_counter(), 0.0, 0
                stage_sums = dict.fromkeys(paths, 0.0)
                order = torch.randperm(n, generator=gen)
                for start in range(0, n - bs + 1, bs):
                    x = to_float(images[order[start:start + bs]], device)
                    loss, parts = loss_of(x)  # mean over the whole batch (the reference: image 0 only)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total, steps = total + float(loss.detach()), steps + 1
                    for path, v in parts.items():
                        stage_sums[path] += v
                history.append({"epoch": epoch + 1, "loss": total / max(steps, 1),
                                "stages": {p: v / max(steps, 1) for p, v in stage_sums.items()},
                                "seconds": time.perf_counter() - t0})
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    with torch.no_grad():
        pattern = torch.sigmoid(pattern_logits).cpu()
        mask = (max_mask * torch.sigmoid(mask_logits)).cpu()
    trigger = RobustKDBlend(shape, seed=seed, pattern=pattern, mask=mask, max_mask=max_mask)
    return TriggerResult(trigger, history, {p: c.tolist() for p, c in chosen.items()},
                         {p: float(t) for p, t in targets.items()}, time.perf_counter() - t_start)
