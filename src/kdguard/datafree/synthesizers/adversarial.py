"""Generator-based adversarial synthesis: ZSKT, DFAD and DAFL.

A persistent generator ``G`` is trained for ``steps`` steps per round against the teacher (and,
for ZSKT/DFAD, the student):

=======  ===========================================================  =====================
method   generator loss (minimised)                                   source
=======  ===========================================================  =====================
ZSKT     ``−KL(T^τ ‖ S^τ)`` (reduction ``mean`` = ÷K, τ = 1)         Micaelli & Storkey
                                                                      2019, Eq. 1; ABD code
DFAD     ``−mean |S(x) − T(x)|`` (logit MAE)                          Fang et al. 2019, Eq. 4
DAFL     ``oh·CE(T, argmax T) − a·mean|f_T| + ie·Σ p̄ log p̄``           Chen et al. 2019,
                                                                      Eq. 2–5
=======  ===========================================================  =====================

Latent codes: ``z_per="round"`` draws one ``z`` per round and keeps it for all generator steps
and for the student's batch (ZSKT's ``LearnableLoader``); ``"step"`` draws a new ``z`` for every
generator step (DFAD, DAFL). Student data: ``sample_mode="last"`` returns ``G(z)`` of the round's
``z`` *after* the generator update, computed once and reused by every student step of the round
(ZSKT; the reference regenerates the identical batch before each of its 10 student steps);
``"fresh"`` draws a new ``z`` per call, generator in train mode, no gradient (DFAD).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ...distill.probe import GuardedTaps
from ...errors import KDGuardError
from ...config import OptimConfig
from ..generators import ConvGenerator
from ..losses import activation_loss, information_entropy_loss, kl_per_sample, l1_per_sample
from ...optim import build_optimizer, set_lr
from .base import Synthesizer, check_image_batch


@dataclass
class Observation:
    """What a generator loss sees for one synthetic batch (all with gradients to ``x``)."""

    x: torch.Tensor
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor | None = None
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


class GeneratorLoss(Protocol):
    """A method's generator objective: ``loss(obs) -> {name: weighted scalar}`` (minimised)."""

    needs_student: bool
    feature_paths: Sequence[str]

    def __call__(self, obs: Observation) -> dict[str, torch.Tensor]: ...


@dataclass
class ZSKTGeneratorLoss:
    """ZSKT: maximise KL(T‖S) (returns ``{"neg_kl": −KL}``); ``reduction`` ``mean`` as the code."""

    temperature: float = 1.0
    reduction: str = "mean"
    needs_student: bool = True
    feature_paths: Sequence[str] = ()

    def __call__(self, obs: Observation) -> dict[str, torch.Tensor]:
        assert obs.student_logits is not None
        kl = kl_per_sample(obs.teacher_logits, obs.student_logits, temperature=self.temperature,
                           reduction=self.reduction).mean()
        return {"neg_kl": -kl}


@dataclass
class DFADGeneratorLoss:
    """DFAD: maximise the logit MAE (returns ``{"neg_l1": −mean|S − T|}``)."""

    needs_student: bool = True
    feature_paths: Sequence[str] = ()

    def __call__(self, obs: Observation) -> dict[str, torch.Tensor]:
        assert obs.student_logits is not None
        return {"neg_l1": -l1_per_sample(obs.teacher_logits, obs.student_logits).mean()}


@dataclass
class DAFLGeneratorLoss:
    """DAFL: one-hot, activation and information-entropy losses on the teacher (weighted).

    ``feature_paths`` names the teacher's penultimate feature module (for the activation term).
    """

    one_hot: float = 1.0
    activation: float = 0.1
    information_entropy: float = 20.0
    feature_paths: Sequence[str] = ()
    needs_student: bool = False

    def __call__(self, obs: Observation) -> dict[str, torch.Tensor]:
        t = obs.teacher_logits.float()
        losses = {"one_hot": self.one_hot * F.cross_entropy(t, t.argmax(1)),
                  "information_entropy": self.information_entropy * information_entropy_loss(t)}
        if self.activation:
            feats = [obs.teacher_features[p] for p in self.feature_paths]
            if not feats:
                raise KDGuardError("DAFL's activation loss needs the teacher's penultimate features",
                                   "give the loss feature_paths (stage_paths(teacher, 'penultimate'))")
            losses["activation"] = self.activation * sum(activation_loss(f) for f in feats)
        return losses


class GeneratorSynthesizer(Synthesizer):
    """A persistent generator trained adversarially (ZSKT, DFAD, DAFL); see the module docstring.

    Args:
        teacher, student: the models (teacher frozen).
        generator: a :class:`~kdguard.datafree.generators.ConvGenerator` on ``device``.
        loss: the method's :class:`GeneratorLoss`.
        optim: generator optimiser settings (ZSKT: Adam 1e-3, cosine, clip 5).
        batch_size: images per generator step (and per "last" batch).
        steps: generator steps per round (ZSKT ``n_generator_iter`` = 1).
        student_mode: BN mode of the student during generator steps ("train" as in ZSKT/DFAD,
            or "eval" as in the CMI code base).
        z_per: "round" or "step".
        sample_mode: "last" or "fresh".
        **kwargs: :class:`Synthesizer` arguments (image_shape, num_classes, device, seed, bf16).

    Raises:
        KDGuardError: bad mode names, generator shape mismatch, or a "last" sample request larger
            than ``batch_size``.
    """

    name = "generator"

    def __init__(self, teacher: nn.Module, student: nn.Module, generator: ConvGenerator,
                 loss: GeneratorLoss, *, optim: OptimConfig, batch_size: int, steps: int = 1,
                 student_mode: str = "train", z_per: str = "round", sample_mode: str = "last",
                 **kwargs: Any) -> None:
        super().__init__(teacher, student, **kwargs)
        for label, value, choices in (("student_mode", student_mode, ("train", "eval")),
                                      ("z_per", z_per, ("round", "step")),
                                      ("sample_mode", sample_mode, ("last", "fresh"))):
            if value not in choices:
                raise KDGuardError(f"{label} {value!r} is not one of {choices}", f"use one of {choices}")
        if tuple(generator.image_shape) != self.image_shape:
            raise KDGuardError(f"generator makes {generator.image_shape} images but the teacher takes "
                               f"{self.image_shape}", "build the generator for the dataset's shape")
        self.generator = generator
        self.loss = loss
        self.optim_settings = optim
        self.optimizer = build_optimizer(generator.parameters(), optim)
        self.batch_size, self.steps = int(batch_size), int(steps)
        self.student_mode, self.z_per, self.sample_mode = student_mode, z_per, sample_mode
        self.reuses_batch = sample_mode == "last"
        self._last: torch.Tensor | None = None
        paths = list(loss.feature_paths)
        self._teacher_taps = GuardedTaps(teacher, paths) if paths else None

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.generator.latent_dim, generator=self.rng, device=self.device)

    def _teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._teacher_taps is not None:
            return self._teacher_taps(x)
        return self.teacher(x), {}

    def set_progress(self, round_index: int, total_rounds: int) -> None:
        set_lr(self.optimizer, self.optim_settings, round_index / max(total_rounds, 1))

    def synthesize(self) -> dict[str, torch.Tensor]:
        self.generator.train()
        self.teacher.eval()
        sums: dict[str, torch.Tensor] = {}
        z = self._z(self.batch_size)
        critic = (self.student_as_critic(self.student_mode) if self.loss.needs_student
                  else contextlib.nullcontext())
        with critic:
            for _ in range(self.steps):
                if self.z_per == "step":
                    z = self._z(self.batch_size)
                with self.autocast():
                    x = self.generator(z)
                    t_logits, t_feats = self._teacher(x)
                    s_logits = self.student(x) if self.loss.needs_student else None
                losses = dict(self.loss(Observation(x, t_logits, s_logits, t_feats)))
                losses.update(self.regularizer_losses(x, t_logits))
                self.optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                if self.optim_settings.grad_clip:
                    nn.utils.clip_grad_norm_(self.generator.parameters(), self.optim_settings.grad_clip)
                self.optimizer.step()
                self._accumulate(sums, losses)
        if self.sample_mode == "last":
            with torch.no_grad(), self.autocast():
                self._last = self.generator(z).float()
            check_image_batch(self._last, self.image_shape, "the generator")
        return self._mean_losses(sums, self.steps)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        if self.sample_mode == "last":
            if self._last is None:
                raise KDGuardError("no synthetic batch yet", "call synthesize() before sample()")
            if n > len(self._last):
                raise KDGuardError(f"asked for {n} images but a round makes {len(self._last)}",
                                   "set schedule.synthesis_batch_size >= schedule.batch_size")
            return self._last if n == len(self._last) else self._last[:n]
        self.generator.train()
        with self.autocast():
            x = self.generator(self._z(n)).float()
        return x

    def preview(self, n: int) -> torch.Tensor:
        if self.sample_mode == "last" and self._last is not None:
            return self._last[:n].detach().float().clamp(0.0, 1.0).cpu()
        return super().preview(n)

    def close(self) -> None:
        if self._teacher_taps is not None:
            self._teacher_taps.remove()

    def extra_state(self) -> dict[str, Any]:
        return {"generator": {k: v.detach().cpu() for k, v in self.generator.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
