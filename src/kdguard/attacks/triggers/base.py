"""The :class:`Trigger` contract, the trigger registry and :func:`build_trigger`.

A trigger is a pure, batched function of images (in the style of ART's perturbation functions):
its parameters are validated and its random pattern is generated once, at construction, from the
parameters and a seed, so ``build_trigger(**trigger.params())`` rebuilds exactly the same trigger.
No image assets are downloaded: patterns that the reference code ships as PNG files are
regenerated from a seed (see each trigger's docstring for the substitution).
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ...errors import KDGuardError
from ...registry import Registry
from .validate import as_image_shape, as_int

TRIGGERS: Registry[type["Trigger"]] = Registry("trigger")

# Float inputs may overshoot [0, 1] by rounding (e.g. after augmentation); more means wrong units.
_RANGE_TOLERANCE = 1e-3


class Trigger(ABC):
    """A backdoor trigger for images of one shape ``(C, H, W)``.

    Calling a trigger on ``x`` returns the triggered images:

    * ``x``: ``uint8`` (values 0–255) or floating (values 0–1), shape ``N×C×H×W`` or ``C×H×W``,
      on any device. The result has the same dtype, shape and device, is clamped to the valid
      range (uint8 results are rounded to the nearest integer), and ``x`` is never modified.
    * Subclasses implement :meth:`_apply` on a float ``N×C×H×W`` batch in ``[0, 1]``.

    Raises:
        KDGuardError: on construction, for bad parameters (a patch larger than the image, a
            position outside it, ...); on call, for a shape other than ``image_shape``, a dtype
            that is neither uint8 nor floating, or float values outside ``[0, 1]``.
    """

    name: ClassVar[str] = "trigger"
    #: parameters naming or fingerprinting files (paths, sha256): a run manifest's trigger record
    #: holds their resolved values, which a rebuild from the manifest must use
    file_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0) -> None:
        self.image_shape = as_image_shape(image_shape)
        self.seed = as_int(self.name, "seed", seed, 0)
        self._device_cache: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        # device copies are a cache: do not ship GPU tensors to pickles or DataLoader workers
        state = dict(self.__dict__)
        state["_device_cache"] = {}
        return state

    # --- construction helpers -------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``self.seed``: patterns never touch the global RNG."""
        return torch.Generator().manual_seed(self.seed)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def height(self) -> int:
        return self.image_shape[1]

    @property
    def width(self) -> int:
        return self.image_shape[2]

    # --- previews -------------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor | None:
        """``bool`` ``1×H×W``: the pixels the trigger may change, or None if it changes all."""
        return None

    @property
    def pattern(self) -> torch.Tensor | None:
        """``float32`` ``C×H×W``: the trigger's pattern (meaning per trigger), or None."""
        return None

    # --- application ----------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self._apply, self._apply_uint8)

    def _run(self, x: torch.Tensor, fn, uint8_fn=None) -> torch.Tensor:
        """Validate ``x``, convert it to float [0, 1], apply ``fn`` and convert back.

        ``uint8_fn`` (optional) handles uint8 batches directly and exactly, skipping the float
        round trip; it returns None when it does not apply.
        """
        batch = self._check_input(x)
        if batch.shape[0] == 0:
            return x.clone()
        if batch.dtype == torch.uint8:
            direct = uint8_fn(batch) if uint8_fn is not None else None
            if direct is not None:
                return direct.reshape(x.shape)
            out = fn(batch.to(torch.float32).div_(255.0))
            # `out` is new or aliases the private float copy, so in-place ops are safe here
            out = out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        else:
            work = batch.to(torch.promote_types(batch.dtype, torch.float32))
            out = fn(work).clamp(0.0, 1.0).to(batch.dtype)  # out-of-place: never touches x
        return out.reshape(x.shape)

    def _apply_uint8(self, x: torch.Tensor) -> torch.Tensor | None:
        """Optional exact uint8 path for ``N×C×H×W`` uint8 ``x`` (must not edit it)."""
        return None

    @abstractmethod
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a float ``N×C×H×W`` batch in ``[0, 1]``; may leave [0, 1], never edit ``x``."""

    def _on(self, key: str, tensor: torch.Tensor, like: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor`` on ``like``'s device, in ``dtype`` (default ``like.dtype``), cached per
        device so a training loop does not copy the pattern to the GPU for every batch."""
        dtype = like.dtype if dtype is None else dtype
        cache_key = (key, str(like.device), dtype)
        cached = self._device_cache.get(cache_key)
        if cached is None:
            cached = tensor.to(device=like.device, dtype=dtype)
            self._device_cache[cache_key] = cached
        return cached

    def _check_input(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise KDGuardError(f"trigger {self.name!r} got a {type(x).__name__}, not a tensor",
                               "pass a torch tensor of shape N×C×H×W or C×H×W")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise KDGuardError(f"trigger {self.name!r} got images of dtype {x.dtype}",
                               "pass uint8 images (0-255) or float images (0-1)")
        if x.dim() not in (3, 4) or tuple(x.shape[-3:]) != self.image_shape:
            raise KDGuardError(
                f"trigger {self.name!r} was built for images of shape {self.image_shape} "
                f"(C, H, W) but got a tensor of shape {tuple(x.shape)}",
                "pass N×C×H×W or C×H×W images of that shape, or build the trigger with "
                "build_trigger(name, image_shape=dataset.shape)")
        batch = x if x.dim() == 4 else x.unsqueeze(0)
        if batch.is_floating_point() and batch.numel():
            low, high = torch.aminmax(batch)
            if low.item() < -_RANGE_TOLERANCE or high.item() > 1 + _RANGE_TOLERANCE:
                raise KDGuardError(
                    f"trigger {self.name!r} got float images with values in "
                    f"[{low.item():.3g}, {high.item():.3g}], not [0, 1]",
                    "pass float images in [0, 1] (divide 0-255 floats by 255; apply the "
                    "trigger before mean/std normalisation)")
        return batch

    # --- parameters -----------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """The trigger-specific keyword parameters of the constructor."""
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]

    def _param_values(self) -> dict[str, Any]:
        """Resolved values of :meth:`param_names`; subclasses store them under the same names."""
        return {k: getattr(self, k) for k in self.param_names()}

    def params(self) -> dict[str, Any]:
        """JSON-serialisable ``{"name", "image_shape", "seed", **parameters}``.

        The values are the resolved ones (defaults filled in), so
        ``build_trigger(**trigger.params())`` rebuilds an identical trigger.
        """
        out = {"name": self.name, "image_shape": list(self.image_shape), "seed": self.seed}
        out.update({k: _jsonable(v) for k, v in self._param_values().items()})
        json.dumps(out)  # fail here, not when a run manifest is written
        return out

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.params().items()
                 if k != "name" and not (isinstance(v, list) and len(v) > 8)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def register_trigger(name: str, *, aliases: tuple[str, ...] = (), **meta: Any):
    """Class decorator: set ``cls.name`` and add the class to :data:`TRIGGERS`."""

    def deco(cls: type[Trigger]) -> type[Trigger]:
        cls.name = name
        TRIGGERS.add(name, cls, aliases=aliases, **meta)
        return cls

    return deco


def build_trigger(name: str, image_shape: tuple[int, int, int], seed: int = 0,
                  **params: Any) -> Trigger:
    """Build a registered trigger by name, e.g. ``build_trigger("blend", (3, 32, 32), alpha=0.1)``.

    Also accepts the output of :meth:`Trigger.params` (``build_trigger(**t.params())``). Only
    registered names are built: a function trigger's name (``pkg.mod:fn``) is refused, because
    these parameters are also read back from files (poison index files, run manifests) and
    kdguard never imports code named by a file.

    Raises:
        KDGuardError: unknown trigger name (lists the valid ones), an import-path name, unknown
            parameter (lists the trigger's valid parameters), or a bad parameter value.
    """
    if isinstance(name, str) and ":" in name:
        raise KDGuardError(f"trigger {name!r} names a function (an import path); kdguard never imports "
                           "code named by a file, and build_trigger builds registered triggers only",
                           f"pass attack.name={name.strip()} on the command line, or "
                           "build_attack(name, ...) in Python")
    cls = TRIGGERS.get(name)
    valid = cls.param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise KDGuardError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for trigger {cls.name!r}",
            f"valid parameters: {', '.join(valid) if valid else 'none'} (plus image_shape, seed)")
    return cls(image_shape, seed=seed, **params)
