"""DeepInversion (Yin et al., CVPR 2020): optimise the input pixels themselves, keep them in a pool.

Every round starts a fresh batch ``u ~ N(0, 1)`` in the teacher's *normalised* input space
(``x = μ + σ·u``), random target labels ``y`` (sorted, as the CMI code), and runs ``steps`` Adam
steps (CMI code base: lr 0.1, β = (0.5, 0.99)) on

    bn·Σ_l R_l(x̃) + oh·CE(T(x̃), y) + adv·(−JS(S(x̃), T(x̃); τ=3)) + tv·TV₂(u) + l2·‖u‖₂ [+ regularisers]

where ``x̃`` is ``x`` randomly rolled (±H/8) and flipped, ``R_l`` the BN-statistics terms
(:mod:`kdguard.datafree.hooks`) and the competition term ``adv`` the Adaptive-DeepInversion
extension (Eq. 8; plain DeepInversion with ``adv = 0``). After each step ``u`` is projected onto
the box that maps to ``[0, 1]`` pixels (NVIDIA's ``clip``). The lowest-loss iterate (measured
before its step, as the reference) joins the image pool; student batches are drawn from the pool
with random crop (pad 4) and flip.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...augment import Augment, jitter_flip
from ...config import OptimConfig
from ..config import DeepInvOptions
from ..hooks import BNStatistics
from ..losses import js_divergence, total_variation
from ...optim import build_optimizer, schedule_factor
from ..pool import ImagePool
from .base import PooledSynthesizer


class DeepInversionSynthesizer(PooledSynthesizer):
    """See the module docstring.

    Args:
        teacher, student: the models (teacher frozen, with BatchNorm layers).
        options: loss weights and augmentation (:class:`DeepInvOptions`).
        optim: the input optimiser (``generator_optim`` of the job).
        batch_size: images inverted per round.
        steps: optimisation steps per round (CMI code base: 1,000; NVIDIA CIFAR: 2,000).
        mean, std: per-channel input statistics (0–1 scale) of the teacher's normalisation.
        augment: augmentation of student batches drawn from the pool (``None``: crop 4 + flip).
        **kwargs: :class:`Synthesizer` arguments.

    Raises:
        KDGuardError: the teacher has no BatchNorm layer.
    """

    name = "deepinv"

    def __init__(self, teacher: nn.Module, student: nn.Module, *, options: DeepInvOptions,
                 optim: OptimConfig, batch_size: int, steps: int, mean: tuple[float, ...],
                 std: tuple[float, ...], augment: Augment | None = None, **kwargs: Any) -> None:
        super().__init__(teacher, student, **kwargs)
        self.options = options
        self.optim_settings = optim
        self.batch_size, self.steps = int(batch_size), int(steps)
        c = self.image_shape[0]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.low, self.high = (0 - self.mean) / self.std, (1 - self.mean) / self.std
        self.bn_stats = BNStatistics(teacher)
        self.pool = ImagePool(self.image_shape, self.device)
        self.augment = augment if augment is not None else Augment(4, hflip=True)
        self._lr_factor = 1.0
        h, w = self.image_shape[1:]
        self.max_shift = (int(h * options.jitter), int(w * options.jitter))

    def set_progress(self, round_index: int, total_rounds: int) -> None:
        self._lr_factor = schedule_factor(self.optim_settings, round_index / max(total_rounds, 1))

    def _losses(self, u: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.options
        x = self.mean + self.std * u
        x_aug = jitter_flip(x, max_shift=self.max_shift, flip=o.flip, host_rng=self.host_rng)
        with self.autocast(), self.bn_stats.recording():
            t_logits = self.teacher(x_aug)
            s_logits = self.student(x_aug) if o.adv else None
        losses = {"bn": o.bn * self.bn_stats.loss(),
                  "one_hot": o.one_hot * F.cross_entropy(t_logits.float(), targets)}
        if s_logits is not None:
            losses["adv"] = o.adv * -js_divergence(s_logits, t_logits, temperature=o.adv_temperature)
        if o.tv:
            losses["tv"] = o.tv * total_variation(u, "l2")
        if o.l2:
            losses["l2"] = o.l2 * torch.linalg.vector_norm(u)
        losses.update(self.regularizer_losses(x_aug, t_logits))
        return losses

    def synthesize(self) -> dict[str, torch.Tensor]:
        self.teacher.eval()
        shape = (self.batch_size, *self.image_shape)
        u = torch.randn(shape, generator=self.rng, device=self.device).requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.rng,
                                device=self.device).sort().values
        settings = self.optim_settings
        optimizer = build_optimizer([u], settings)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * self._lr_factor
        best_cost = torch.full((), float("inf"), device=self.device)
        best_u = u.detach().clone()
        sums: dict[str, torch.Tensor] = {}
        with self.student_as_critic("eval"):
            for _ in range(self.steps):
                losses = self._losses(u, targets)
                total = sum(losses.values())
                with torch.no_grad():  # keep the best iterate on the device: no host sync
                    better = total.detach() < best_cost
                    best_cost = torch.where(better, total.detach(), best_cost)
                    best_u = torch.where(better, u.detach(), best_u)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                with torch.no_grad():
                    u.copy_(torch.minimum(torch.maximum(u, self.low), self.high))
                self._accumulate(sums, losses)
        self.pool.add(self.mean + self.std * best_u)
        out = self._mean_losses(sums, self.steps)
        out["best"] = best_cost
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"])
