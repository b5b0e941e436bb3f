"""Forward hooks on a teacher's BatchNorm layers: DeepInversion's statistics loss and CMI's features.

For every ``BatchNorm2d`` with running statistics the hook sees the layer's *input* ``a``
(``N×C×H×W``) and records, while recording is switched on:

* the feature-distribution regulariser of DeepInversion (Yin et al., CVPR 2020, Eq. 4, in the
  form of NVIDIA's ``DeepInversionFeatureHook`` and CMI's ``DeepInversionHook``)::

      R_l = ‖ μ_l(a) − running_mean_l ‖₂ + ‖ σ²_l(a) − running_var_l ‖₂

  with the batch mean ``μ_l`` over (N, H, W) and the *biased* batch variance ``σ²_l``; the
  total is ``Σ_l R_l`` (Euclidean norms, not squared);
* optionally the per-instance channel means ``mean_{H,W}(a)`` (``N×C``), which CMI
  (Fang et al., IJCAI 2021) concatenates over all BN layers as its contrastive feature.

Statistics are computed in float32 even under bf16 autocast. Hooks do nothing unless
:meth:`BNStatistics.recording` is active, so the teacher's ordinary forward passes (student
steps, evaluation) pay nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import KDGuardError


class BNStatistics:
    """Hooks on every ``BatchNorm2d`` (with running stats) of ``model``.

    Args:
        model: usually the teacher, in eval mode (its running statistics are the targets).
        instance_means: also record per-instance channel means (CMI).

    Raises:
        KDGuardError: the model has no BatchNorm2d layer with running statistics.

    After a forward pass inside ``with stats.recording():``, :meth:`loss` is the scalar
    ``Σ_l R_l`` and :meth:`instance_features` the ``N×Σ_l C_l`` concatenated instance means of
    that pass (each later forward pass overwrites them).
    """

    def __init__(self, model: nn.Module, *, instance_means: bool = False) -> None:
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.BatchNorm2d) and m.track_running_stats
                       and m.running_mean is not None]
        if not self.layers:
            raise KDGuardError(f"model {getattr(model, 'arch', type(model).__name__)!r} has no "
                               "BatchNorm2d layer with running statistics",
                               "BN-statistics matching (DeepInversion, CMI) needs a teacher with "
                               "BatchNorm, e.g. resnet20 or wrn16_2; use zskt, dfad or ood otherwise")
        self.instance_means = instance_means
        self._recording = False
        self._terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self._means: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    @property
    def feature_dim(self) -> int:
        """Length of :meth:`instance_features` rows: the summed channel count of the BN layers."""
        return sum(int(m.num_features) for m in self.layers)

    def _hook(self, index: int):
        def hook(module: nn.BatchNorm2d, inputs: tuple, output: object) -> None:
            if not self._recording:
                return
            a = inputs[0].float()
            mean = a.mean(dim=(0, 2, 3))
            var = a.var(dim=(0, 2, 3), unbiased=False)
            self._terms[index] = (torch.linalg.vector_norm(mean - module.running_mean.float())
                                  + torch.linalg.vector_norm(var - module.running_var.float()))
            if self.instance_means:
                self._means[index] = a.mean(dim=(2, 3))

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator["BNStatistics"]:
        """Record statistics of the forward passes made inside the block."""
        self._recording = True
        self._terms = [None] * len(self.layers)
        self._means = [None] * len(self.layers)
        try:
            yield self
        finally:
            self._recording = False

    def _collected(self, items: list[torch.Tensor | None], what: str) -> list[torch.Tensor]:
        if any(t is None for t in items):
            raise KDGuardError(f"no {what} recorded for some BatchNorm layers",
                               "run the model's forward inside `with stats.recording():`")
        return items  # type: ignore[return-value]

    def loss(self) -> torch.Tensor:
        """``Σ_l ‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂`` of the last recorded pass (float32 scalar)."""
        return torch.stack(self._collected(self._terms, "statistics")).sum()

    def layer_losses(self) -> torch.Tensor:
        """The per-layer terms ``R_l`` of the last recorded pass (float32, one per BN layer)."""
        return torch.stack(self._collected(self._terms, "statistics"))

    def instance_features(self) -> torch.Tensor:
        """``N×Σ_l C_l`` per-instance channel means of every BN input (CMI's feature)."""
        if not self.instance_means:
            raise KDGuardError("instance means were not requested", "build BNStatistics(..., instance_means=True)")
        return torch.cat(self._collected(self._means, "instance means"), dim=1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
