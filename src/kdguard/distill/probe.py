"""Feature taps for training passes, and a dry run that finds feature shapes.

A forward hook records a module's output *tensor*; a later in-place operation (typically
``nn.ReLU(inplace=True)`` after a BatchNorm, or a residual ``out += identity``) would turn a
recorded pre-ReLU feature into the post-ReLU one. :class:`kdguard.taps.FeatureTaps` stores a
clone at hook time, so the feature is what the module produced whatever follows it: models
written the common (torchvision) way need no edit. :class:`GuardedTaps` adds that features are
recorded only during the taps' own passes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import KDGuardError
from ..taps import FeatureTaps


class GuardedTaps(FeatureTaps):
    """:class:`kdguard.taps.FeatureTaps` that record only while the taps themselves run the model.

    Same arguments and return value as ``FeatureTaps``. Forward passes made elsewhere (e.g.
    evaluating the student between epochs) keep no features alive. Features are clones of the
    modules' outputs, true even when a later in-place operation overwrites the output tensor.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], **kwargs) -> None:
        self._active = False
        super().__init__(model, paths, **kwargs)

    def _hook(self, path: str) -> Callable:
        record = super()._hook(path)

        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if self._active:  # e.g. an evaluation pass on the bare student: record nothing
                record(module, inputs, output)

        return hook

    def __call__(self, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._active = True
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._active = False

    def clear(self) -> None:
        """Drop the recorded features (and with them any autograd graph they keep alive)."""
        self.features = {}


@dataclass(frozen=True)
class Probe:
    """What a dry run found: the model's output shape and per-path feature shapes (no batch dim)."""

    output_shape: tuple[int, ...]
    feature_shapes: list[tuple[int, ...]]


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate a per-sample image shape ``(C, H, W)`` of positive integers."""
    try:
        shape = tuple(operator.index(d) for d in input_shape)  # ints only (numpy ints too)
    except TypeError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise KDGuardError(f"input_shape {input_shape!r} is not (C, H, W) with positive integers",
                           "pass the per-sample image shape, e.g. (3, 32, 32)")
    return shape  # type: ignore[return-value]


def probe(model: nn.Module, paths: Sequence[str], input_shape: Sequence[int], *,
          batch_size: int = 2) -> Probe:
    """Run one dummy batch (uniform [0, 1) images, fixed seed) through ``model`` in eval mode.

    The model's train/eval mode is restored afterwards and no gradient is recorded; the hooks
    are removed before returning.

    Args:
        model: any ``nn.Module`` taking ``N×C×H×W`` float images.
        paths: module paths whose output shapes are wanted.
        input_shape: ``(C, H, W)``.
        batch_size: dummy batch size (2: some layers reject a batch of one).

    Returns:
        :class:`Probe` with the output shape and the per-sample shape of each path's output.

    Raises:
        KDGuardError: bad ``input_shape``, an unknown path, a module not called, a non-tensor
            output, or a tapped output modified in place (see :class:`GuardedTaps`).
    """
    shape = check_input_shape(input_shape)
    device, dtype = _device_dtype(model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, *shape, generator=g).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with GuardedTaps(model, paths, detach=True) as taps, torch.no_grad():
            out, feats = taps(x)
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise KDGuardError(f"{type(model).__name__} returned a {type(out).__name__}, not a logits tensor",
                           "distil models whose forward returns N×K logits")
    return Probe(tuple(out.shape[1:]), [tuple(feats[p].shape[1:]) for p in paths])


def feature_shapes(model: nn.Module, paths: Sequence[str],
                   input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-sample output shapes (no batch dimension) of the modules at ``paths``; see :func:`probe`."""
    return probe(model, paths, input_shape).feature_shapes
