"""A trigger given as the user's own batched function (``attack.name=pkg.mod:fn``).

The function is imported only from a name the user passes on the command line or in a Python
call (:func:`load_trigger_function`); a name read back from a file (a run manifest, a poison
index file) is refused before anything is imported (:func:`kdguard.attacks.attack_from_manifest`,
:func:`~.base.build_trigger`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from ...errors import KDGuardError
from .base import _RANGE_TOLERANCE, Trigger


def load_trigger_function(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Import the function named ``pkg.mod:fn`` (``fn`` may be dotted, e.g. ``Cls.method``).

    Importing runs the module's code: call this only with a name the user typed.

    Raises:
        KDGuardError: a malformed name, a module that cannot be imported (or fails while being
            imported), a missing attribute, or an attribute that is not callable.
    """
    module_name, _, attr = path.partition(":") if isinstance(path, str) else ("", "", "")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise KDGuardError(f"trigger function name {path!r} is not of the form pkg.module:function",
                           "give attack.name=pkg.module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # the user's module: any failure while importing it
        raise KDGuardError(f"cannot import module {module_name!r} for trigger function {path!r} "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
                           "make the module importable (install it or add its folder to PYTHONPATH), "
                           "or fix attack.name") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KDGuardError(f"module {module_name!r} has no attribute {attr!r}",
                               "fix the function name after the colon in attack.name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KDGuardError(f"trigger function {path!r} is of type {type(obj).__name__}, not a function",
                           "point attack.name at a function images -> images")
    return obj


def function_label(fn: Callable) -> str:
    """``module:qualname`` of ``fn`` (how a manifest names a function trigger)."""
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', type(fn).__name__)}"


class FunctionTrigger(Trigger):
    """Wrap ``fn(images) -> images`` as a :class:`Trigger`.

    ``fn`` gets a float ``N×C×H×W`` batch in [0, 1] (its own copy, on the caller's device; uint8
    inputs are converted and back) and must return a floating tensor of the same shape on the
    same device with values in [0, 1], without NaN. Every output is checked (the base class
    already reads the input's range on every call); out-of-range values are refused, not clamped,
    since they mean the function works in other units (0–255, normalised).

    Not in the trigger registry: :meth:`params` records ``{"name": "pkg.mod:fn", "image_shape",
    "seed"}`` and :func:`~.base.build_trigger` refuses to rebuild it from that record, so the
    function is only ever imported from the user's own command line or Python call.

    Args:
        image_shape: ``(C, H, W)``.
        seed: recorded for uniformity; seeding the function is the function's business.
        fn: the function.
        label: the name recorded in :meth:`params` (default ``module:qualname`` of ``fn``).

    Raises:
        KDGuardError: on construction, ``fn`` not callable; on call, an exception inside ``fn``,
            or an output that is not a floating tensor of the input's shape and device with
            finite values in [0, 1].
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int = 0, *,
                 fn: Callable[[torch.Tensor], torch.Tensor], label: str | None = None) -> None:
        if not callable(fn):
            raise KDGuardError(f"trigger function {fn!r} is not callable",
                               "pass a function images -> images")
        self.name = label or function_label(fn)  # per instance: the function's name, not a class name
        super().__init__(image_shape, seed)
        self.fn = fn

    def params(self) -> dict[str, Any]:
        """``{"name": "pkg.mod:fn", "image_shape", "seed"}`` (JSON-serialisable)."""
        return {"name": self.name, "image_shape": list(self.image_shape), "seed": self.seed}

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.fn(x.clone())
        except KDGuardError:
            raise
        except Exception as err:  # the user's code: report it on one line
            first = str(err).splitlines()[0] if str(err) else ""
            raise KDGuardError(f"trigger function {self.name!r} raised {type(err).__name__}: {first}",
                               "fix the function; it gets float images N×C×H×W in [0, 1] and returns "
                               "the same shape in [0, 1]") from None
        return self._check_output(x, out)

    def _check_output(self, x: torch.Tensor, out: Any) -> torch.Tensor:
        fix = "return a float tensor of the input's shape N×C×H×W, on its device, with values in [0, 1]"
        if not isinstance(out, torch.Tensor):
            raise KDGuardError(f"trigger function {self.name!r} returned a {type(out).__name__}, "
                               "not a tensor", fix)
        if tuple(out.shape) != tuple(x.shape):
            raise KDGuardError(f"trigger function {self.name!r} returned shape {tuple(out.shape)} for "
                               f"input shape {tuple(x.shape)}", fix)
        if not out.is_floating_point():
            raise KDGuardError(f"trigger function {self.name!r} returned dtype {out.dtype}, "
                               "not a floating dtype", fix)
        if out.device != x.device:
            raise KDGuardError(f"trigger function {self.name!r} returned a tensor on {out.device} for "
                               f"input on {x.device}", fix)
        if out.numel():
            low, high = (v.item() for v in torch.aminmax(out.detach()))
            if not (low >= -_RANGE_TOLERANCE and high <= 1 + _RANGE_TOLERANCE):  # NaN fails too
                raise KDGuardError(f"trigger function {self.name!r} returned values in "
                                   f"[{low:.3g}, {high:.3g}], not [0, 1]",
                                   "make it return images in [0, 1] (not 0-255, not mean/std "
                                   "normalised), without NaN")
        return out.to(x.dtype)
