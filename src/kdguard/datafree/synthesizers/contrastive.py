"""CMI: Contrastive Model Inversion (Fang et al., IJCAI 2021), as run by ABD's ``cmi/`` code.

Every round (one "epoch" of the reference):

1. re-initialise the generator (N(0, 0.02) weights, :func:`~kdguard.datafree.generators.reinitialize`),
   draw ``z ~ N(0, 1)`` and sorted random labels ``y``; optimise generator and ``z`` jointly with
   a fresh Adam (lr 1e-3, β = (0.5, 0.999)) for ``steps`` steps on

       bn·Σ_l R_l(x_g) + oh·CE(T(x_g), y) + adv·L_adv + cr·L_cr [+ regularisers]

   * ``x_g`` = global view of ``x = G(z)`` (random crop, pad 4, + flip), ``x_l`` = local view
     (random resized crop, area 0.25–1, + flip);
   * ``R_l``: BN-statistics terms of the teacher on the global view (DeepInversion);
   * ``L_adv = −mean(KL(T‖S) · 1[argmax S = argmax T])`` on the global view, student in eval
     mode (:func:`~kdguard.datafree.losses.negative_masked_kl`);
   * ``L_cr``: InfoNCE between the projected instance features (per-instance channel means of
     every teacher BN input, concatenated) of the local view (anchors) and the global view
     (positives, detached), with up to ``negatives`` cached pairs from the memory bank as extra
     rows (:func:`~kdguard.datafree.losses.info_nce`); the projection head (Linear-ReLU-Linear,
     L2-normalised) has its own Adam that persists across rounds;
2. the lowest-loss batch of the round (measured before its step) joins the image pool and its
   (local, global) features join the memory bank;
3. student batches are drawn from the whole pool with random crop (pad 4) and flip.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...augment import Augment, random_resized_crop
from ...config import OptimConfig
from ..config import CMIOptions
from ..generators import ConvGenerator, reinitialize
from ..hooks import BNStatistics
from ..losses import info_nce, negative_masked_kl
from ...optim import build_optimizer, schedule_factor
from ..pool import ImagePool, MemoryBank
from .base import PooledSynthesizer


class ProjectionHead(nn.Module):
    """CMI's ``MLPHead``: Linear(d, d) → ReLU → Linear(d, out), then L2 normalisation per row.

    Input float ``N×d`` → output ``N×out`` with unit rows.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_in)
        self.fc2 = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc2(F.relu(self.fc1(x))), dim=1)


class CMISynthesizer(PooledSynthesizer):
    """See the module docstring.

    Args:
        teacher, student: the models (teacher frozen, with BatchNorm layers).
        generator: a :class:`ConvGenerator` (the CMI reference uses kind ``dcgan``).
        options: :class:`CMIOptions` (weights, contrastive temperature, bank sizes).
        optim: the generator/``z`` optimiser settings (``generator_optim``).
        batch_size: synthesis batch (ABD sweep: 256).
        steps: generator steps per round (``g_steps``; ABD: 200).
        augment: augmentation of student batches from the pool (``None``: crop 4 + flip).
        **kwargs: :class:`Synthesizer` arguments.

    Raises:
        KDGuardError: the teacher has no BatchNorm layer, or a bad crop scale.
    """

    name = "cmi"

    def __init__(self, teacher: nn.Module, student: nn.Module, generator: ConvGenerator, *,
                 options: CMIOptions, optim: OptimConfig, batch_size: int, steps: int,
                 augment: Augment | None = None, **kwargs: Any) -> None:
        super().__init__(teacher, student, **kwargs)
        self.generator = generator
        self.options = options
        self.optim_settings = optim
        self.batch_size, self.steps = int(batch_size), int(steps)
        self.bn_stats = BNStatistics(teacher, instance_means=True)
        dim = self.bn_stats.feature_dim
        self.head = ProjectionHead(dim, options.head_dim).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=optim.lr)
        self.bank = MemoryBank(options.bank_size, 2 * dim, self.device)
        self.pool = ImagePool(self.image_shape, self.device)
        self.augment = augment if augment is not None else Augment(4, hflip=True)
        self._global_view = Augment(4, hflip=True)
        self._lr_factor = 1.0

    def set_progress(self, round_index: int, total_rounds: int) -> None:
        self._lr_factor = schedule_factor(self.optim_settings, round_index / max(total_rounds, 1))

    def _step_losses(self, z: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        o = self.options
        with self.autocast():
            x = self.generator(z)
        x_global = self._global_view(x, generator=self.rng)
        x_local = random_resized_crop(x, scale=tuple(o.local_scale), flip=True, generator=self.rng)
        with self.autocast(), self.bn_stats.recording():
            t_logits = self.teacher(x_global)
            loss_bn = self.bn_stats.loss()
            f_global = self.bn_stats.instance_features()
            self.teacher(x_local)
            f_local = self.bn_stats.instance_features()
            s_logits = self.student(x_global) if o.adv else None
        losses = {"bn": o.bn * loss_bn,
                  "one_hot": o.one_hot * F.cross_entropy(t_logits.float(), targets)}
        if s_logits is not None:
            losses["adv"] = o.adv * negative_masked_kl(t_logits, s_logits)
        if o.cr:
            cached = self.bank.get(o.negatives, self.rng)
            c_local, c_global = cached.chunk(2, dim=1)
            rows = torch.cat([f_local.float(), c_local, f_global.float(), c_global])
            proj_local, proj_global = self.head(rows).chunk(2, dim=0)
            losses["contrastive"] = o.cr * info_nce(proj_local, proj_global, temperature=o.cr_temperature,
                                                    n_current=len(z) if len(cached) else None)
        losses.update(self.regularizer_losses(x_global, t_logits))
        features = torch.cat([f_local.detach().float(), f_global.detach().float()], dim=1)
        return losses, x.detach(), features

    def synthesize(self) -> dict[str, torch.Tensor]:
        self.teacher.eval()
        self.generator.train()
        if self.options.reinit_generator:
            reinitialize(self.generator, self.rng)
        z = torch.randn(self.batch_size, self.generator.latent_dim, generator=self.rng,
                        device=self.device).requires_grad_(True)
        targets = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.rng,
                                device=self.device).sort().values
        optimizer = build_optimizer([{"params": list(self.generator.parameters())}, {"params": [z]}],
                                    self.optim_settings)
        for group in optimizer.param_groups:
            group["lr"] = self.optim_settings.lr * self._lr_factor
        best_cost = torch.full((), float("inf"), device=self.device)
        best_x = torch.zeros(self.batch_size, *self.image_shape, device=self.device)
        best_f = torch.zeros(self.batch_size, self.bank.dim, device=self.device)
        sums: dict[str, torch.Tensor] = {}
        with self.student_as_critic("eval"):
            for _ in range(self.steps):
                losses, x, feats = self._step_losses(z, targets)
                total = sum(losses.values())
                with torch.no_grad():  # best iterate tracked on the device: no host sync
                    better = total.detach() < best_cost
                    best_cost = torch.where(better, total.detach(), best_cost)
                    best_x = torch.where(better, x.float(), best_x)
                    best_f = torch.where(better, feats, best_f)
                optimizer.zero_grad(set_to_none=True)
                self.head_optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                self.head_optimizer.step()
                self._accumulate(sums, losses)
        self.pool.add(best_x)
        self.bank.add(best_f)
        out = self._mean_losses(sums, self.steps)
        out["best"] = best_cost
        return out

    def extra_state(self) -> dict[str, Any]:
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        return {"generator": cpu(self.generator.state_dict()), "head": cpu(self.head.state_dict()),
                "head_optimizer": self.head_optimizer.state_dict(), "pool": self.pool.state_dict(),
                "bank": self.bank.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.pool.load_state_dict(state["pool"])
        self.bank.load_state_dict(state["bank"])
