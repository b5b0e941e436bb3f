"""ABD's Self-Retrospection (SR): late in distillation, the student synthesises the backdoor it
may have learned as a universal perturbation and unlearns it.

Hong et al., ICML 2023, §4.2; reference ``UnlearnOptimizer`` (``cmi/datafree/unlearn.py``) and
``zskt/solver.py`` (``sup_backdoor``, ``use_hg``). For every student update in the SR phase
(the last ``phase`` share of the round budget) on a synthetic batch ``x`` (``N×C×H×W``):

1. **Perturbation.** ``δ ∈ R^{1×C×H×W}`` (universal), from ``δ = 0``, ``inner_steps`` Adam steps
   (lr ``inner_lr``) on ``−KL(M(x) ‖ M(x + δ)) + λ‖δ‖²`` with ``M`` the teacher (ABD sweeps) or the
   student (``perturb_model``), in eval mode. KL: τ = 1 summed over classes (``divergence=kl``,
   kdguard's default), or the method's own KD divergence (``divergence=method``, what the
   reference codes do: ZSKT τ = 1 ÷ K, i.e. K times weaker; CMI τ = 20 with τ²). No pixel clipping
   (as the reference). δ is optimised in the *normalised* input space, as in the reference whose
   models take normalised tensors: kdguard's models take [0, 1] images, so the image gets
   ``std·δ`` (``input_std``, the teacher's per-channel std); without this rescaling the same
   learning rate makes a perturbation 1/std times larger (≈ 3–4× on MNIST and CIFAR-10). With
   ``M`` = teacher, δ depends only on ``x``: it is computed once per
   batch and reused by the student steps of a round that share the batch (ZSKT).
2. **Unlearning loss.** A random subset B of the batch (``max(min_count, round(share·N))``
   samples, capped at N; the reference's ``hg_out_portion`` = 2 % gives 2 of 128 and none below
   50) gets δ::

       ℓ_out(δ, θ) = weight · Σ_{i∈B} KL(S_θ(x_i) ‖ S_θ(x_i + δ)) / N      (outer_reduction=batch,
                                                                     the reference's batchmean)
                     weight · mean_{i∈B} KL(…)                         (=perturbed, N/|B| × stronger)

   with the clean logits detached (``detach_clean``; the ZSKT code) or not (the CMI code).
3. **Hypergradient.** δ*(θ) is treated as the solution of the student's inner problem
   ``ℓ_in(δ, θ) = −KL(S_θ(x) ‖ S_θ(x + δ)) + λ‖δ‖²`` and the update uses
   ``dℓ_out/dθ = ∂_θ ℓ_out + (∂_θ Φ)ᵀ v`` from :func:`~kdguard.abd.hypergrad.fixed_point_hypergradient`
   (``K`` = ``hypergradient_steps``, α = ``hypergradient_step_size``), as I-BAU does. With
   ``hypergradient=False`` only the direct term ∂_θ ℓ_out is used (plain adversarial unlearning).
4. The method's usual distillation loss (KD, + attention for ZSKT) is added, the sum is clipped
   and stepped. With ``modules`` (kdguard's option; the reference updates every parameter) the
   gradient of ℓ_out, direct and implicit, reaches only the parameters under those module paths;
   confined to the convolutions, the student cannot lower ℓ_out by lowering the target class in
   its classifier layers (``docs/abd-results.md`` §5).

Phase and learning rate: the reference resumes a near-final checkpoint with a fresh optimiser at
a reset learning rate (5e-4) and a cosine schedule over what is left. kdguard does the same
inside one run: at the first SR round the optimiser state is cleared (``reset_optimizer``) and
the learning rate follows ``lr · ½(1 + cos(π·(r − r₀)/(R − r₀)))`` over rounds ``r₀ ≤ r < R``
(a :func:`kdguard.optim.lr_scheduler` over the phase's rounds, which takes over from the loop's
schedule for each SR round).

The extra student forwards of steps 2–3 run in train mode (batch statistics) with the BN running
statistics frozen, so unlearning does not move them. They run in float32 (``amp=False``, the
default) or under the run's bf16 autocast (``amp=True``: about 1.5× faster on CPU, hypergradient
within about 3 % of float32's). On CPU they run in NCHW layout even when the student is
channels_last (:func:`nchw_forward`): an SR round is 1.2–1.3× slower in channels_last there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from .config import SelfRetrospectionConfig
from ..datafree.losses import kl_per_sample
from ..datafree.student import StudentStepContext, default_student_step, frozen
from ..errors import KDGuardError
from ..optim import advance, lr_scheduler
from ..taps import resolve_module
from .hypergrad import fixed_point_hypergradient


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep using batch statistics in train mode but do not update their running
    statistics (momentum 0 and ``num_batches_tracked`` restored)."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in model.modules() if isinstance(m, _BatchNorm)]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nchw_forward(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s forward with its 4-D weights and its input in contiguous (NCHW) layout.

    SR back-propagates twice through the student (the hypergradient). On CPU, the reductions of
    BatchNorm's double backward and ReLU's backward are several times slower on channels_last
    tensors, which made an SR round 1.2–1.3× slower than in NCHW (``docs/abd-cost.md`` §1).
    ``p.contiguous()`` is differentiable, so gradients still reach the parameters; the copies of
    the weights cost little next to the activations. Returns ``model`` itself when no parameter
    is channels_last, or on CUDA, where the channels_last kernels are the fast ones.
    """
    def channels_last_only(p: torch.Tensor) -> bool:
        return p.dim() == 4 and not p.is_contiguous()

    params = dict(model.named_parameters())
    if not any(channels_last_only(p) for p in params.values()) or \
            any(p.device.type == "cuda" for p in params.values()):
        return model

    def forward(x: torch.Tensor) -> torch.Tensor:
        weights = {name: p.contiguous() for name, p in model.named_parameters()}
        return functional_call(model, weights, (x.contiguous(),))

    return forward


def kl_summed(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax p ‖ softmax q) at τ = 1, summed over classes (SR's default)."""
    return kl_per_sample(p_logits, q_logits, reduction="batchmean")


def universal_perturbation(model: nn.Module, x: torch.Tensor, reference_logits: torch.Tensor, *,
                           steps: int = 10, lr: float = 0.1, l2: float = 1e-3,
                           scale: torch.Tensor | float = 1.0,
                           divergence: Divergence = kl_summed) -> torch.Tensor:
    """u (``1×C×H×W``, float32) maximising ``KL(M(x) ‖ M(x + s·u)) − λ‖u‖²`` by Adam from u = 0.

    The perturbation added to the images is ``s·u``. With ``s`` = the per-channel input std
    (``1×C×1×1``), u lives in the normalised input space where the reference optimises it
    (its models take normalised tensors), so ``lr`` and λ mean what they mean there.

    Args:
        model: M, run as it is (callers put it in eval mode and freeze its weights).
        x: float ``N×C×H×W`` in the model's input space.
        reference_logits: M(x), ``N×K`` (no gradient needed).
        steps, lr, l2: Adam steps, learning rate and λ (ABD: 10, 0.1, 0.001).
        scale: s, a float or a tensor broadcastable to ``1×C×H×W``.
        divergence: per-sample divergence ``(p_logits, q_logits) -> N`` (default
            :func:`kl_summed`); its batch mean is maximised.
    """
    u = torch.zeros((1, *x.shape[1:]), device=x.device, requires_grad=True)
    if steps == 0:
        return u.detach()
    opt = torch.optim.Adam([u], lr=lr)
    ref = reference_logits.detach().float()
    for _ in range(steps):
        out = model(x + scale * u).float()
        loss = -divergence(ref, out).mean() + l2 * u.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return u.detach()


def centred_logit_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``‖(b − a) − mean_k(b − a)‖²`` of two ``N×K`` logit batches: zero when they
    differ by a constant per sample, unchanged when one class's logit moves alike in both (SR's
    ``unlearn=logit`` term: a student cannot lower it by dropping the target class)."""
    diff = b - a
    return (diff - diff.mean(1, keepdim=True)).pow(2).sum(1)


def target_directed_perturbation(model: nn.Module, x: torch.Tensor, target: int, *, steps: int = 50,
                                 lr: float = 0.1, l1: float = 0.01,
                                 scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """u (``1×C×H×W``, float32) minimising ``CE(M(x + s·u), target) + l1·‖u‖₁`` by Adam from u = 0:
    the sparsest universal change that sends the batch to ``target`` (kdguard's SR search,
    ``abd.sr.search=sparse``; the objective of Neural Cleanse's trigger reverse-engineering, Wang
    et al., S&P 2019, with an additive δ instead of a mask and pattern).

    The KL search (:func:`universal_perturbation`) starts where its gradient vanishes and grows a
    dense pattern of the target class's own features (on MNIST a faint target digit over the whole
    image), whose unlearning suppresses the class; the cross-entropy towards a named class has a
    gradient at u = 0, and the L1 term keeps only the few pixels that matter most, which on a
    backdoored model are the trigger's (docs/abd-results.md §4).

    Args:
        model: M in eval mode with frozen weights; x: float ``N×C×H×W`` in its input space.
        target: the class (e.g. where the KL search's δ sends most of the batch).
        steps, lr, l1: Adam steps, learning rate, L1 weight (on u, normalised units).
        scale: s, as :func:`universal_perturbation`.
    """
    u = torch.zeros((1, *x.shape[1:]), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    labels = torch.full((len(x),), int(target), device=x.device, dtype=torch.long)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x + scale * u).float(), labels) + l1 * u.abs().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return u.detach()


def accumulate(params: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...] | list[torch.Tensor]) -> None:
    """Add ``grads`` to the ``.grad`` of ``params`` (after the distillation losses' backward). A
    parameter neither reaches keeps ``grad`` None, so the optimiser takes no decay step on it."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is not None:
            p.grad = p.grad + g
        elif g.any():
            p.grad = g


class SelfRetrospection:
    """The SR plug-in: a ``student_step`` for :class:`~kdguard.datafree.loop.DataFreeExtensions`.

    Before the SR phase it is the method's plain step; in the phase it runs steps 1–4 of the module
    docstring and logs ``sr_unlearn`` (ℓ_out) besides the method's losses.

    Args:
        cfg: :class:`~kdguard.abd.config.SelfRetrospectionConfig`.
        seed: seeds the choice of perturbed samples (checkpointed).
        input_std: the teacher's per-channel input std (δ's units, see the module docstring).
        trigger: a known or reconstructed trigger (``N×C×H×W`` in [0, 1] → same; e.g. a ``kdguard
            audit``'s, ``abd.sr.from_audit``). Given, no δ is searched: the chosen samples are
            stamped with it (the pixels it changes on the image clamped to [0, 1]; the others
            stay as synthesised) and the student unlearns it with the direct
            gradient of the outer loss (a fixed trigger solves no inner problem, so there is no
            hypergradient) — Neural Cleanse's unlearning (Wang et al., S&P 2019, §VI-C) on the
            synthetic batch, in SR's place and schedule.
    """

    def __init__(self, cfg: SelfRetrospectionConfig | None = None, *, seed: int = 0,
                 input_std: tuple[float, ...] | None = None,
                 trigger: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.cfg = cfg or SelfRetrospectionConfig()
        self.input_std = input_std
        self.trigger = trigger
        self.generator = torch.Generator().manual_seed(seed)
        self.entered = False
        self.steps = 0
        self.target: int | None = None  # the sparse search's class at its last call
        self.votes: dict[int, int] = {}  # per class, the sparse searches whose KL δ pointed there
        self._delta_key: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None
        self._schedule: torch.optim.lr_scheduler.LambdaLR | None = None
        self._schedule_at: tuple[int, int, int] | None = None  # (round, rounds, optimiser) it is at

    @property
    def uses_hypergradient(self) -> bool:
        """Whether SR's update adds the implicit hypergradient: only a KL-searched δ solves the
        student's inner problem (a given trigger or a sparse δ does not)."""
        return self.cfg.hypergradient and self.trigger is None and self.cfg.search == "kl"

    def phase_start(self, total_rounds: int) -> int:
        """First round (0-based) of the SR phase: the last ``max(1, ceil(phase·R))`` rounds."""
        return total_rounds - min(total_rounds, max(1, math.ceil(self.cfg.phase * total_rounds)))

    def in_phase(self, round_index: int, total_rounds: int) -> bool:
        return round_index >= self.phase_start(total_rounds)

    def phase_factor(self, total_rounds: int) -> Callable[[int], float]:
        """The learning-rate factor ½(1 + cos(πk/span)) at the phase's ``k``-th round."""
        span = max(total_rounds - self.phase_start(total_rounds), 1)
        return lambda k: 0.5 * (1.0 + math.cos(math.pi * k / span))

    def phase_lr(self, round_index: int, total_rounds: int) -> float:
        """The SR learning rate at ``round_index`` (``lr`` times :meth:`phase_factor`)."""
        return self.cfg.lr * self.phase_factor(total_rounds)(round_index - self.phase_start(total_rounds))

    def _apply_lr(self, optimizer: torch.optim.Optimizer, round_index: int, total_rounds: int) -> None:
        """Put the phase's schedule on ``optimizer`` at ``round_index`` (the loop's own schedule
        set its rate at the round start): stepped on from the previous round, else built there."""
        at = (round_index, total_rounds, id(optimizer))
        if at == self._schedule_at:
            return
        if (self._schedule is not None and self._schedule_at is not None
                and (round_index - 1, total_rounds, id(optimizer)) == self._schedule_at):
            advance(self._schedule)
        else:
            self._schedule = lr_scheduler(optimizer, self.cfg.lr, self.phase_factor(total_rounds),
                                          start=round_index - self.phase_start(total_rounds))
        self._schedule_at = at

    def perturbed_count(self, batch_size: int) -> int:
        return min(batch_size, max(self.cfg.min_count, round(self.cfg.share * batch_size)))

    # -- the step ------------------------------------------------------------------------------
    def _scale(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.input_std is None:
            return 1.0
        return torch.tensor(self.input_std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)

    def divergence(self, ctx: StudentStepContext) -> Divergence:
        """SR's per-sample divergence: :func:`kl_summed` (``divergence=kl``) or the method's own
        KD divergence (``divergence=method``: its temperature, reduction and τ², as the reference
        codes do; ZSKT: τ = 1, ÷K; CMI: τ = 20, τ², batchmean; DFAD's L1 becomes a KL at its τ)."""
        if self.cfg.divergence == "kl":
            return kl_summed
        obj = ctx.objective

        def method_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
            per = kl_per_sample(p_logits, q_logits, temperature=obj.temperature, reduction=obj.reduction)
            return per * obj.temperature**2 if obj.t2_scale else per

        return method_kl

    def _perturbation(self, ctx: StudentStepContext, scale: torch.Tensor | float,
                      div: Divergence) -> torch.Tensor:
        c = self.cfg
        if c.perturb_model == "teacher":
            if self._delta_key is ctx.x and self._delta is not None:
                return self._delta
            with ctx.autocast():
                delta = universal_perturbation(ctx.teacher, ctx.x, ctx.teacher_outputs.logits,
                                               steps=c.inner_steps, lr=c.inner_lr, l2=c.l2, scale=scale,
                                               divergence=div)
                if c.search == "sparse":
                    delta = self._sparse(ctx.teacher, ctx.x, delta, scale)
            self._delta_key, self._delta = ctx.x, delta
            return delta
        student = ctx.student
        was_training = student.training
        student.eval()
        try:
            with frozen(student), torch.no_grad(), ctx.autocast():
                ref = student(ctx.x).float()
            with frozen(student), ctx.autocast():
                delta = universal_perturbation(student, ctx.x, ref, steps=c.inner_steps,
                                               lr=c.inner_lr, l2=c.l2, scale=scale, divergence=div)
                return self._sparse(student, ctx.x, delta, scale) if c.search == "sparse" else delta
        finally:
            student.train(was_training)

    def _sparse(self, model: nn.Module, x: torch.Tensor, delta: torch.Tensor,
                scale: torch.Tensor | float) -> torch.Tensor:
        """The sparse search towards the class the KL search's ``delta`` sends most of ``x`` to."""
        c = self.cfg
        with torch.no_grad():
            batch_target = int(model(x + scale * delta).argmax(1).mode().values)
        # the class most of the phase's batches pointed to so far: one odd batch does not steer
        self.votes[batch_target] = self.votes.get(batch_target, 0) + 1
        target = max(self.votes, key=lambda k: (self.votes[k], k == batch_target))
        self.target = target
        return target_directed_perturbation(model, x, target, steps=c.sparse_steps, lr=c.inner_lr,
                                            l1=c.l1, scale=scale)

    def __call__(self, ctx: StudentStepContext) -> dict[str, torch.Tensor]:
        if not self.in_phase(ctx.round_index, ctx.total_rounds):
            return default_student_step(ctx)
        c = self.cfg
        if not self.entered:
            self.entered = True
            if c.reset_optimizer:
                ctx.optimizer.state.clear()
        self._apply_lr(ctx.optimizer, ctx.round_index, ctx.total_rounds)

        x, student = ctx.x, ctx.student
        n = len(x)
        scale = self._scale(x)
        div = self.divergence(ctx)
        chosen = torch.randperm(n, generator=self.generator)[:self.perturbed_count(n)].to(x.device)
        rows = torch.zeros(n, 1, 1, 1, device=x.device)
        rows[chosen] = 1.0
        if self.trigger is not None:
            return self._unlearn_trigger(ctx, div, chosen, rows)
        delta = self._perturbation(ctx, scale, div)  # u, in normalised units; the images get scale·u

        outputs = ctx.forward_student()
        losses = ctx.distill_losses(outputs)
        forward = nchw_forward(student) if c.nchw else student
        precision = ctx.autocast if c.amp else contextlib.nullcontext
        # The clean logits come from the same precision as the SR passes below (the KD forward
        # may be bf16), so that the KL is exactly 0 at δ = 0.
        with torch.no_grad(), frozen_bn_statistics(student), precision():
            clean = forward(x).float()
        params = self.unlearn_parameters(student)
        last: dict[str, torch.Tensor] = {}

        def outer_loss(d: torch.Tensor) -> torch.Tensor:
            with frozen_bn_statistics(student), precision():
                if c.unlearn == "logit":
                    ref = forward(x).float()
                else:
                    ref = clean if c.detach_clean else forward(x).float()
                perturbed = forward(x + scale * d * rows).float()
            value = self._unlearning_term(self._per_sample(div, ref, perturbed)[chosen], n)
            last["sr_unlearn"] = value.detach()
            return value

        def inner_loss(d: torch.Tensor) -> torch.Tensor:
            with frozen_bn_statistics(student), precision():
                perturbed = forward(x + scale * d).float()
            return -div(clean, perturbed).mean() + c.l2 * d.pow(2).sum()

        ctx.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        if self.uses_hypergradient:
            grads = fixed_point_hypergradient(delta, params, inner_loss, outer_loss,
                                              steps=c.hypergradient_steps,
                                              step_size=c.hypergradient_step_size)
        else:
            grads = torch.autograd.grad(outer_loss(delta), params, allow_unused=True)
        accumulate(params, grads)
        ctx.clip_and_step()
        self.steps += 1
        losses["sr_unlearn"] = last["sr_unlearn"]
        return losses

    def unlearn_parameters(self, student: nn.Module) -> list[torch.Tensor]:
        """The trainable parameters the unlearning term's gradient reaches: all of them, or with
        ``modules`` those of the named submodules (``block1`` takes ``block1.conv.weight``…; a
        parameter's own path, e.g. ``fc.bias``, takes that parameter), each once.

        Raises:
            KDGuardError: a path names no submodule or parameter of ``student`` (with the valid
                paths, :func:`kdguard.taps.resolve_module`), or one without trainable parameters.
        """
        if self.cfg.modules is None:
            return [p for p in student.parameters() if p.requires_grad]
        chosen: dict[int, torch.Tensor] = {}
        for path in self.cfg.modules:
            try:
                params = [student.get_parameter(path)]
            except AttributeError:
                try:
                    params = list(resolve_module(student, path).parameters())
                except KDGuardError as err:
                    raise KDGuardError(f"abd.sr.modules: {err.problem}", err.fix) from None
            trainable = [p for p in params if p.requires_grad]
            if not trainable:
                raise KDGuardError(f"abd.sr.modules names {path!r}, which holds no trainable parameter "
                                   f"of the student", "name a submodule with trainable weights")
            for p in trainable:
                chosen.setdefault(id(p), p)
        return list(chosen.values())

    def _per_sample(self, div: Divergence, ref: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """Per-sample unlearning terms between clean and perturbed logits (``N``): the divergence
        (``unlearn=kl``) or :func:`centred_logit_distance` (``unlearn=logit``)."""
        return centred_logit_distance(ref, perturbed) if self.cfg.unlearn == "logit" else div(ref, perturbed)

    def _unlearning_term(self, per_sample: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``weight`` × the perturbed samples' divergences reduced as ``outer_reduction`` says:
        their mean (``perturbed``) or their sum over the batch size (``batch``, the reference's)."""
        c = self.cfg
        value = per_sample.mean() if c.outer_reduction == "perturbed" else per_sample.sum() / batch_size
        return c.weight * value

    def _unlearn_trigger(self, ctx: StudentStepContext, div: Divergence, chosen: torch.Tensor,
                         rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step with a given trigger: the method's losses plus ``weight`` × the divergence
        from the student's (``audit_reference=student``) or the teacher's (``teacher``) output on
        the clean samples to the student's on their stamped copies (SR's reduction)."""
        c, x, student = self.cfg, ctx.x, ctx.student
        n = len(x)
        outputs = ctx.forward_student()
        losses = ctx.distill_losses(outputs)
        forward = nchw_forward(student) if c.nchw else student
        precision = ctx.autocast if c.amp else contextlib.nullcontext
        with torch.no_grad():
            # the trigger needs [0, 1] images; synthetic ones may lie outside. Only the pixels the
            # trigger changes take its stamped value, the others stay exactly as synthesised (a
            # clamp of the whole image would teach invariance to the clamp, not to the trigger).
            inside = x.detach().clamp(0, 1)
            marked = self.trigger(inside)
            stamped = torch.where(rows.bool() & (marked != inside), marked, x)
        with frozen_bn_statistics(student), precision():
            if c.unlearn == "logit":
                ref = forward(x).float()
            elif c.audit_reference == "teacher":
                ref = ctx.teacher_outputs.logits.detach().float()
            elif c.detach_clean:
                with torch.no_grad():
                    ref = forward(x).float()
            else:
                ref = forward(x).float()
            value = self._unlearning_term(self._per_sample(div, ref, forward(stamped).float())[chosen], n)
        ctx.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        params = self.unlearn_parameters(student)
        accumulate(params, torch.autograd.grad(value, params, allow_unused=True))
        ctx.clip_and_step()
        self.steps += 1
        losses["sr_unlearn"] = value.detach()
        return losses

    def summary(self) -> dict[str, Any]:
        return {"phase": self.cfg.phase, "sr_steps": self.steps, "perturb_model": self.cfg.perturb_model,
                "hypergradient": self.uses_hypergradient,
                "amp": self.cfg.amp, "oracle_trigger": self.cfg.oracle_trigger,
                "perturbation": "given trigger" if self.trigger is not None else
                ("search" if self.cfg.search == "kl" else "sparse search"), "suspected_target": self.target,
                "target_votes": {str(k): v for k, v in sorted(self.votes.items())},
                "from_audit": self.cfg.from_audit, "audit_class": self.cfg.audit_class,
                "audit_reference": self.cfg.audit_reference,
                "modules": None if self.cfg.modules is None else list(self.cfg.modules)}

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"entered": self.entered, "steps": self.steps, "rng": self.generator.get_state(),
                "votes": torch.tensor(sorted(self.votes.items()), dtype=torch.long).view(-1, 2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entered, self.steps = bool(state["entered"]), int(state["steps"])
        self.generator.set_state(state["rng"])
        self.votes = {int(k): int(v) for k, v in state.get("votes", torch.zeros(0, 2, dtype=torch.long)).tolist()}
