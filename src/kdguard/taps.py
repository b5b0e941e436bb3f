"""Read (or edit) intermediate features of any ``nn.Module`` by module path, via forward hooks.

The model's ``forward`` is never rewritten: a tap registers a forward hook on each named
submodule (``model.get_submodule(path)``) and records its output, or its input with
``capture="input"`` (for example the pre-activation input of a ReLU). Paths are the dotted names
of ``model.named_modules()``, e.g. ``"layer2"`` or ``"layer3.1.bn2"``; the empty path ``""``
means the model itself.

Example::

    taps = FeatureTaps(model, ["layer1", "layer2", "layer3"])
    logits, feats = taps(x)          # feats: {"layer1": N×C1×H1×W1, ...}
    taps.remove()

or as a context manager (hooks removed on exit)::

    with FeatureTaps(model, paths) as taps:
        logits, feats = taps(x)

Editing hooks (``FeatureEditor``) replace a module's output by ``fn(output)``; RobustKD's
feature detoxification is built on them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from .errors import KDGuardError


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return ``model``'s submodule at ``path`` or raise :class:`KDGuardError` naming close paths."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
        raise KDGuardError(
            f"module path {path!r} does not exist in {type(model).__name__}",
            f"{hint}valid paths: {shown}",
        ) from None


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel/DistributedDataParallel keep the real model in .module.
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


class FeatureTaps:
    """Record the outputs (or inputs) of submodules named by path during a forward pass.

    Args:
        model: any ``nn.Module`` (DataParallel/DDP wrappers are unwrapped for path lookup).
        paths: module paths to tap, in the order the features should be returned.
        capture: ``"output"`` (default) records what the module returns; ``"input"`` records its
            first positional input.
        detach: store ``tensor.detach()`` (for teachers), else keep the autograd graph.

    Features are stored as clones, so they hold the module's true output even when the model
    modifies that tensor in place afterwards (torchvision-style ``ReLU(inplace=True)``).

    Raises:
        KDGuardError: a path does not exist, or a tapped module returned a non-tensor.

    The feature dict is reset at the start of every ``__call__``, so features from an earlier
    pass (e.g. an evaluation pass) never leak into a training step.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], *,
                 capture: Literal["output", "input"] = "output", detach: bool = False) -> None:
        if capture not in ("output", "input"):
            raise KDGuardError(f"capture {capture!r} is not supported", "use 'output' or 'input'")
        self.model = model
        self.paths = list(paths)
        self.capture = capture
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        base = _unwrap(model)
        self._handles = [resolve_module(base, p).register_forward_hook(self._hook(p)) for p in self.paths]

    def _hook(self, path: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            value = inputs[0] if self.capture == "input" else output
            if not isinstance(value, torch.Tensor):
                raise KDGuardError(
                    f"module {path!r} produced a {type(value).__name__}, not a tensor",
                    "tap a module whose output is a single tensor")
            # a clone: a following in-place op (``ReLU(inplace=True)``, ``out += identity``) would
            # otherwise change the recorded value, or break autograd through it
            self.features[path] = value.detach().clone() if self.detach else value.clone()

        return hook

    def __call__(self, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the model; return ``(model output, {path: feature})`` in the order of ``paths``."""
        self.features = {}
        out = self.model(*args, **kwargs)
        missing = [p for p in self.paths if p not in self.features]
        if missing:
            raise KDGuardError(f"modules {missing} were not called during forward",
                               "tap modules that the model's forward actually uses")
        return out, {p: self.features[p] for p in self.paths}

    def remove(self) -> None:
        """Remove the hooks; the model is exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.features = {}

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class FeatureEditor:
    """Replace the outputs of submodules by ``fns[path](output)`` during forward.

    ``fns`` maps module path → callable ``Tensor -> Tensor`` (same shape). Hooks stay until
    :meth:`remove` (or the end of a ``with`` block). Used by RobustKD's detoxification: the edited
    output feeds the rest of the network, so downstream stages see the edited features.
    """

    def __init__(self, model: nn.Module, fns: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        base = _unwrap(model)
        self._handles = []
        for path, fn in fns.items():
            module = resolve_module(base, path)
            self._handles.append(module.register_forward_hook(lambda m, i, o, fn=fn: fn(o)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureEditor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
