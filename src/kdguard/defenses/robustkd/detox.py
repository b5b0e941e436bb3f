"""RobustKD's feature detoxification: masked replacement of a teacher's stage features.

Chen et al., "Robust Knowledge Distillation Based on Feature Variance Against Backdoored Teacher
Model" (arXiv 2406.03409; Applied Soft Computing 2024, 111907). In the reference code
(``Xming-Z/RobustKD``, ``WideResNet.forward_feature``) every detoxified stage output ``F_l`` is
replaced, before it feeds the next stage, by

    F̂_l = (1 − M_l) ⊙ F_l + M_l ⊙ P_l                                   ("replace", default)

with a mask ``M_l ∈ [0, 1]`` and a replacement feature ``P_l`` initialised from clean-sample mean
features. The reference PyramidNet uses an additive variant ``F̂_l = F_l + M_l ⊙ P_l``, offered
as ``combine="additive"``. Here ``M_l = sigmoid(Z_l)`` with learnable logits ``Z_l``, so it stays
in [0, 1] without clamping (``Z = ±inf`` gives an exact 0 or 1). ``M_l`` is per channel and
position (``C×H×W``, ``granularity="element"``, default: the shape of the reference's shipped
tensors) or per channel (``C×1×1``, ``"channel"``); ``P_l`` is always ``C×H×W``.

The edit is applied through forward hooks (:meth:`FeatureDetox.attach`), so the teacher's code is
not touched and the edited output is what every later module, and every later hook, sees: the
hooks are *prepended*, so feature taps on the same module (OFD's teacher taps) record the
detoxified feature whatever the order in which they were registered.

:meth:`FeatureDetox.save` / :meth:`FeatureDetox.load` store ``Z`` and ``P`` with safetensors
(tensors only, with the paths and options as metadata), so a run's detoxified teacher can be
rebuilt exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import KDGuardError, check_range
from ...io import atomic_write
from ...taps import resolve_module
from .stats import StageStats

GRANULARITIES = ("channel", "element")
COMBINES = ("replace", "additive")
FILE_FORMAT = "kdguard.robustkd.detox/1"
#: file name of the saved detoxification inside a run directory
DETOX_FILE = "detox.safetensors"


def _logit(p: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 − p))`` with exact ±inf at 0 and 1 (so ``sigmoid`` gives back 0 and 1)."""
    return torch.log(p) - torch.log1p(-p)


def _check_shape(shape: Sequence[int], where: str) -> tuple[int, int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise KDGuardError(f"{where}: feature shape {shape} is not C×H×W",
                           "detoxify convolutional stage outputs (4-D feature maps)")
    return shape  # type: ignore[return-value]


class StageDetox(nn.Module):
    """The edit of one stage: ``F̂ = (1 − M) ⊙ F + M ⊙ P`` (or ``F + M ⊙ P``).

    Args:
        shape: per-sample feature shape ``(C, H, W)``.
        granularity: ``"channel"`` (``M`` is ``C×1×1``) or ``"element"`` (``C×H×W``).
        combine: ``"replace"`` or ``"additive"`` (see the module docstring).
        init_mask: initial value of every ``M`` entry, in [0, 1) (0 gives logits −inf: the
            identity, but no gradient reaches the mask).
        replacement: initial ``P`` (``C×H×W``; default zeros), e.g. the clean mean map.

    Parameters: ``mask_logits`` (``Z``) and ``replacement`` (``P``), float32.

    Forward: ``f`` of shape ``N×C×H×W`` (any float dtype) → same shape and dtype.

    Raises:
        KDGuardError: bad shape/option values; on forward, a feature whose shape differs.
    """

    def __init__(self, shape: Sequence[int], *, granularity: str = "element", combine: str = "replace",
                 init_mask: float = 0.05, replacement: torch.Tensor | None = None) -> None:
        super().__init__()
        self.shape = _check_shape(shape, "detox stage")
        if granularity not in GRANULARITIES:
            raise KDGuardError(f"unknown mask granularity {granularity!r}", "use 'channel' or 'element'")
        if combine not in COMBINES:
            raise KDGuardError(f"unknown detox combine rule {combine!r}", "use 'replace' or 'additive'")
        check_range("detox init_mask", float(init_mask), 0.0, 1.0, high_open=True)
        self.granularity, self.combine = granularity, combine
        c, h, w = self.shape
        mshape = (c, 1, 1) if granularity == "channel" else (c, h, w)
        self.mask_logits = nn.Parameter(_logit(torch.full(mshape, float(init_mask), dtype=torch.float32)))
        if replacement is None:
            replacement = torch.zeros(self.shape)
        if tuple(replacement.shape) != self.shape:
            raise KDGuardError(f"replacement of shape {tuple(replacement.shape)} does not match the "
                               f"stage shape {self.shape}", "initialise P from the same stage's features")
        self.replacement = nn.Parameter(replacement.detach().float().clone())

    def mask(self) -> torch.Tensor:
        """``M = sigmoid(Z)``, ``C×1×1`` or ``C×H×W``, values in [0, 1] (with gradient)."""
        return torch.sigmoid(self.mask_logits)

    def set_mask(self, values: torch.Tensor | float) -> None:
        """Overwrite ``M`` (broadcast to the mask's shape; values in [0, 1], 0/1 exact)."""
        v = torch.as_tensor(values, dtype=torch.float32)
        if v.numel() and (float(v.min()) < 0 or float(v.max()) > 1):
            raise KDGuardError("mask values must lie in [0, 1]", "clip them or pass probabilities")
        with torch.no_grad():
            self.mask_logits.copy_(_logit(v.to(self.mask_logits.device)).expand_as(self.mask_logits))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or tuple(f.shape[1:]) != self.shape:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise KDGuardError(f"detox stage built for features N×{'×'.join(map(str, self.shape))} got {shape}",
                               "build the detoxification for this model and input size")
        m = self.mask().to(f.dtype)
        p = self.replacement.to(f.dtype)
        if self.combine == "additive":
            return f + m * p
        return (1 - m) * f + m * p

    def extra_repr(self) -> str:
        return f"shape={self.shape}, granularity={self.granularity!r}, combine={self.combine!r}"


class DetoxHooks:
    """Handle of the forward hooks a :class:`FeatureDetox` put on a model.

    ``record=True`` keeps the last edited output of every stage in :attr:`outputs` (with
    gradient), for objectives that read the detoxified features. Setting :attr:`enabled` to
    False makes the hooks pass outputs through unchanged (the original teacher) without
    removing them. Use as a context manager or call :meth:`remove`; after removal the model is
    exactly as before.
    """

    def __init__(self, detox: "FeatureDetox", model: nn.Module, *, record: bool = False) -> None:
        self.record = record
        self.enabled = True
        self.outputs: dict[str, torch.Tensor] = {}
        base = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
        self._handles = []
        for path, stage in zip(detox.paths, detox.stages):
            module = resolve_module(base, path)
            self._handles.append(module.register_forward_hook(self._hook(path, stage), prepend=True))

    def _hook(self, path: str, stage: StageDetox):
        def hook(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor | None:
            if not self.enabled:
                return None
            if not isinstance(output, torch.Tensor):
                raise KDGuardError(f"module {path!r} produced a {type(output).__name__}, not a tensor",
                                   "detoxify modules whose output is a single feature map")
            edited = stage(output)
            if self.record:
                self.outputs[path] = edited
            return edited

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "DetoxHooks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class FeatureDetox(nn.Module):
    """The masks ``M_l`` and replacements ``P_l`` of every detoxified stage of one teacher.

    Args:
        shapes: ``{module path: (C, H, W)}``, in forward order (shallow to deep).
        granularity, combine, init_mask: as in :class:`StageDetox`, shared by all stages.
        replacements: optional ``{path: P}`` initial replacements (``C×H×W``).

    Attributes:
        paths: the module paths, in order; ``stages``: one :class:`StageDetox` per path.

    Raises:
        KDGuardError: no paths, repeated paths, bad shapes or options.

    Use :meth:`from_stats` to initialise ``P`` from clean mean features, :meth:`attach` to edit a
    model, :meth:`save`/:meth:`load` to keep it with a run.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], *, granularity: str = "element",
                 combine: str = "replace", init_mask: float = 0.05,
                 replacements: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if not shapes:
            raise KDGuardError("no stages to detoxify", "give at least one module path")
        paths = [str(p) for p in shapes]
        if len(set(paths)) != len(paths):
            raise KDGuardError(f"detox paths {paths} repeat a module", "list each module once")
        replacements = dict(replacements or {})
        self.paths = paths
        self.granularity, self.combine = granularity, combine
        self.metadata: dict = {}
        self.stages = nn.ModuleList(
            StageDetox(shapes[p], granularity=granularity, combine=combine, init_mask=init_mask,
                       replacement=replacements.get(p)) for p in paths)

    @classmethod
    def from_stats(cls, stats: Mapping[str, StageStats], **options) -> "FeatureDetox":
        """A detoxification whose ``P_l`` are the clean mean maps ``stats[path].mean``."""
        return cls({p: s.shape for p, s in stats.items()},
                   replacements={p: s.mean for p, s in stats.items()}, **options)

    # -- access -----------------------------------------------------------------------------
    def stage(self, path: str) -> StageDetox:
        if path not in self.paths:
            raise KDGuardError(f"no detox stage {path!r}", f"use one of: {', '.join(self.paths)}")
        return self.stages[self.paths.index(path)]

    def masks(self) -> dict[str, torch.Tensor]:
        """``{path: M}`` detached float32 CPU copies (``C×1×1`` or ``C×H×W``)."""
        return {p: s.mask().detach().float().cpu() for p, s in zip(self.paths, self.stages)}

    def replacements(self) -> dict[str, torch.Tensor]:
        """``{path: P}`` detached float32 CPU copies (``C×H×W``)."""
        return {p: s.replacement.detach().float().cpu() for p, s in zip(self.paths, self.stages)}

    def channel_masks(self) -> dict[str, torch.Tensor]:
        """``{path: C}`` mask per channel (element masks averaged over positions)."""
        return {p: m.mean((1, 2)) for p, m in self.masks().items()}

    def summary(self, threshold: float = 0.5) -> dict[str, dict[str, float]]:
        """Per stage: mean mask value and the fraction of units with ``M > threshold``."""
        return {p: {"mean_mask": float(m.mean()), "fraction_masked": float((m > threshold).float().mean()),
                    "units": int(m.numel())} for p, m in self.masks().items()}

    def freeze(self, frozen: bool = True) -> "FeatureDetox":
        """Stop (or restart) gradients into ``M`` and ``P``; returns ``self``."""
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self

    def binarize(self, threshold: float = 0.5) -> "FeatureDetox":
        """Set every ``M`` to exactly 1 where ``M > threshold`` and 0 elsewhere; returns ``self``."""
        check_range("mask threshold", float(threshold), 0.0, 1.0, low_open=True, high_open=True)
        for s in self.stages:
            s.set_mask((s.mask().detach() > threshold).float())
        return self

    # -- applying ---------------------------------------------------------------------------
    def attach(self, model: nn.Module, *, record: bool = False) -> DetoxHooks:
        """Edit ``model``'s stage outputs until the returned handle is removed.

        Raises:
            KDGuardError: a path does not exist in ``model`` (on attach) or its output has
                another shape (on the first forward pass).
        """
        return DetoxHooks(self, model, record=record)

    # -- saving -----------------------------------------------------------------------------
    def save(self, path: str | Path, metadata: Mapping[str, object] | None = None) -> Path:
        """Write ``Z`` and ``P`` of every stage to a safetensors file (atomically).

        ``metadata`` (JSON-serialisable) is stored beside the options, e.g. the teacher's path.
        """
        tensors = {}
        for p, s in zip(self.paths, self.stages):
            tensors[f"{p}::mask_logits"] = s.mask_logits.detach().float().cpu().contiguous().clone()
            tensors[f"{p}::replacement"] = s.replacement.detach().float().cpu().contiguous().clone()
        meta = {"format": FILE_FORMAT, "paths": json.dumps(self.paths), "granularity": self.granularity,
                "combine": self.combine, "shapes": json.dumps([list(s.shape) for s in self.stages]),
                "extra": json.dumps(dict(metadata or {}), default=str)}
        return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureDetox":
        """Rebuild a saved detoxification (frozen: no gradient into ``M``, ``P``).

        Raises:
            KDGuardError: the file is missing, unreadable or not a kdguard detox file.
        """
        path = Path(path)
        if path.is_dir():
            path = path / DETOX_FILE
        if not path.is_file():
            raise KDGuardError(f"detox file {str(path)!r} does not exist",
                               f"point to a RobustKD run directory or its {DETOX_FILE}")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise KDGuardError(f"cannot read detox file {str(path)!r} ({e})",
                               "give a file written by FeatureDetox.save") from None
        if meta.get("format") != FILE_FORMAT:
            raise KDGuardError(f"{str(path)!r} is not a kdguard detox file (format "
                               f"{meta.get('format')!r})", "give a file written by FeatureDetox.save")
        paths = json.loads(meta["paths"])
        shapes = json.loads(meta["shapes"])
        detox = cls(dict(zip(paths, shapes)), granularity=meta["granularity"], combine=meta["combine"])
        for p, s in zip(paths, detox.stages):
            z, rep = tensors.get(f"{p}::mask_logits"), tensors.get(f"{p}::replacement")
            if z is None or rep is None or z.shape != s.mask_logits.shape or rep.shape != s.replacement.shape:
                raise KDGuardError(f"detox file {str(path)!r} lacks or mis-shapes the tensors of stage {p!r}",
                                   "re-save it with FeatureDetox.save")
            with torch.no_grad():
                s.mask_logits.copy_(z)
                s.replacement.copy_(rep)
        detox.metadata = json.loads(meta.get("extra", "{}"))
        return detox.freeze()

    def extra_repr(self) -> str:
        return f"paths={self.paths}"


def masked_fraction(detox: FeatureDetox, threshold: float = 0.5) -> float:
    """Fraction of all mask units (over every stage) with ``M > threshold``."""
    masks = list(detox.masks().values())
    total = sum(m.numel() for m in masks)
    return sum(float((m > threshold).sum()) for m in masks) / max(total, 1)
