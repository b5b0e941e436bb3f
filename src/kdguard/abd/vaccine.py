"""ABD's Shuffling Vaccine (SV): find synthetic samples that carry the backdoor and suppress them.

Hong et al., ICML 2023, §4.1; reference ``BackdoorSuspectLoss`` (``syn_vaccine.py``). With the
teacher T, the shuffled teacher T̃ (:class:`~kdguard.abd.shuffle.ShuffledTeacher`) and the
per-sample divergence ``D(x) = KL(p_T(x) ‖ p_T̃(x)) / K`` (K classes, the reference's
``.mean(1)``):

* suspicion mask ``m(x) = 1[argmax T̃(x) = argmax T(x)]`` (:meth:`ShufflingVaccine.suspicion_mask`);
* generator form (ZSKT, DFAD, DAFL, DeepInversion, CMI): the synthesis loss gets the term
  ``sv_maximize_divergence = −coef · Σ_i m_i D(x_i) / Σ_i m_i`` (0 when nothing is suspicious).
  Minimising it *maximises* the divergence on suspicious samples, steering synthesis away from
  trigger-like images. The logged value is therefore ≤ 0;
* student form (OOD proxy data, where there is no generator; ABD ``vanilla_kd_ood.py``): the
  per-sample KD losses ℓ_i become ``kd = mean_{m=0} ℓ_i`` plus
  ``sv_push_away = −coef · mean_{m=1} ℓ_i`` (the student moves away from the teacher on
  suspicious samples);
* verification (optional, ``verify_batches > 0``; reference ``pseudo_test_batches``): while
  pending the vaccine only watches. Batches ``verify_skip+1 .. verify_batches`` are cached. Then
  ``s = log10 D`` is computed on the cache and the *tail ratio* is the share of samples with
  ``s < mean(s) − 3·std(s)`` (unusually low divergence: the backdoor's signature). SV switches on
  when the ratio exceeds ``tail_threshold``. Otherwise the ensemble is re-shuffled and tested
  again, up to ``max_trials`` times; if every trial fails, SV stays off for the run.

A *call* is one batch the vaccine sees: a generator/pixel step in the generator form, a student
step in the student form. State (status, call counter, permutations, trial log and the pending
cache, float32, and the flagged-sample counts) is checkpointed
through :meth:`state_dict` / :meth:`load_state_dict`, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..datafree.losses import kl_per_sample
from ..errors import KDGuardError
from .shuffle import ShuffledTeacher

PENDING, ACTIVE, OFF = "pending", "active", "off"


def divergence_per_sample(teacher_logits: torch.Tensor, shuffled_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(t) ‖ softmax(t̃)) / K`` per sample (float32 ``N``, ≥ 0), ABD's SV divergence."""
    return kl_per_sample(teacher_logits, shuffled_logits, temperature=1.0, reduction="mean")


def tail_ratio(divergence: torch.Tensor, sigmas: float = 3.0) -> float:
    """Share of samples whose ``log10`` divergence lies below ``mean − sigmas·std`` (ABD's
    vaccine verification statistic). ``divergence``: ``N`` values ≥ 0 (clamped at 1e-12)."""
    s = divergence.float().clamp_min(1e-12).log10()
    if s.numel() < 2:
        return 0.0
    return float((s < s.mean() - sigmas * s.std(correction=0)).float().mean())  # np.std, as the reference


class ShufflingVaccine:
    """The SV plug-in: a generator regulariser (``__call__``) and an OOD sample weighting
    (:meth:`sample_weighting`) around one :class:`ShuffledTeacher`.

    With ``shuffle_grad`` on CPU, the generator form runs T̃ once without gradient to flag the
    suspicious samples, then with gradient on those rows only, as long as the last call flagged at
    most ``SUBSET_MAX_SHARE`` of its batch; above that, one pass with gradient on the whole batch
    is cheaper. On a GPU it always makes the one whole-batch pass (no host sync).

    Args:
        teacher: the frozen teacher (eval mode).
        shuffled: its shuffled ensemble.
        coef: weight of the vaccine (reference 0.1).
        shuffle_grad: let gradients flow through T̃ in the generator form (reference default);
            ``False`` computes T̃ without gradient (the reference's ``--no_shuf_grad``; cheaper).
        verify_batches, verify_skip, tail_threshold, max_trials: verification (module docstring);
            ``verify_batches=0`` switches SV on at once.
        generator: CPU RNG for re-shuffles.
        autocast: context-manager factory for the forward passes (bf16 or no-op).

    Raises:
        KDGuardError: negative ``coef`` or inconsistent verification sizes.
    """

    #: above this share of flagged samples (at the last call), T̃ runs with gradient on the whole
    #: batch instead of a no-gradient pass plus a gradient pass on the flagged rows
    SUBSET_MAX_SHARE = 0.5

    def __init__(self, teacher: nn.Module, shuffled: ShuffledTeacher, *, coef: float = 0.1,
                 shuffle_grad: bool = True, verify_batches: int = 0, verify_skip: int = 10,
                 tail_threshold: float = 0.02, max_trials: int = 8,
                 generator: torch.Generator | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        if coef < 0:
            raise KDGuardError(f"vaccine coef {coef!r} must be >= 0", "use e.g. 0.1")
        if verify_batches and verify_batches <= verify_skip:
            raise KDGuardError(f"verify_batches {verify_batches} must exceed verify_skip {verify_skip}",
                               "use e.g. ShufflingVaccine(..., verify_batches=50, verify_skip=10)")
        self.teacher, self.shuffled = teacher, shuffled
        self.coef, self.shuffle_grad = float(coef), bool(shuffle_grad)
        self.verify_batches, self.verify_skip = int(verify_batches), int(verify_skip)
        self.tail_threshold, self.max_trials = float(tail_threshold), int(max_trials)
        self.generator = generator if generator is not None else torch.Generator()
        self.autocast = autocast
        self.status = PENDING if self.verify_batches else ACTIVE
        self.calls = 0
        self.trials: list[float] = []  # tail ratio of each verification trial
        self._cache: list[torch.Tensor] = []
        self._last_share = 0.0  # share flagged at the last generator-form call
        # samples the active vaccine saw and flagged (a device tensor: no host sync)
        self.seen, self._flagged = 0, torch.zeros(())
        self._marks = (0, 0.0)  # (seen, flagged) at the last interval_log
        self.__name__ = "shuffling_vaccine"

    # -- the two primitives ----------------------------------------------------------------
    def shuffled_logits(self, x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """T̃(x) (``N×K``, float32); with ``grad`` the graph reaches ``x``."""
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self.autocast():
            return self.shuffled(x).float()

    @torch.no_grad()
    def suspicion_mask(self, x: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``N``: the shuffled teacher predicts the same class as the teacher.

        Args:
            x: float ``N×C×H×W`` in the teacher's input space.
            teacher_logits: T(x) if already computed (``N×K``), else the teacher is run.
        """
        if teacher_logits is None:
            with self.autocast():
                teacher_logits = self.teacher(x)
        return self.shuffled_logits(x).argmax(1) == teacher_logits.argmax(1)

    @property
    def active(self) -> bool:
        return self.status == ACTIVE and self.coef > 0

    # -- generator form ------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator regulariser ``{"sv_maximize_divergence": −coef·mean_suspicious D}``.

        Args:
            x: the synthetic batch (float ``N×C×H×W``, with gradient to the generator/inputs).
            teacher_logits: T(x) (``N×K``, with gradient to ``x``).

        Returns:
            A scalar to be *minimised* (≤ 0); a zero without gradient while SV is pending or off.
        """
        self._watch(x)
        if not self.active:
            return {"sv_maximize_divergence": torch.zeros((), device=x.device)}
        on_cpu = x.device.type == "cpu"
        if not (self.shuffle_grad and on_cpu and self._last_share <= self.SUBSET_MAX_SHARE):
            shuffled = self.shuffled_logits(x, grad=self.shuffle_grad)
            mask = (shuffled.argmax(1) == teacher_logits.argmax(1)).detach()
            div = divergence_per_sample(teacher_logits, shuffled)
            if self.shuffle_grad and on_cpu:  # (a host sync, free on CPU)
                self._last_share = float(mask.float().mean())
            self._count(mask)
            mean_suspicious = (mask * div).sum() / mask.sum().clamp_min(1)
            return {"sv_maximize_divergence": -self.coef * mean_suspicious}
        # Only suspicious samples carry the term, so only they need T̃'s backward: flag them
        # without gradient, then run T̃ with gradient on those rows alone (the copies are in eval
        # mode, so a row's logits do not depend on the others). Same value and gradient, about
        # half of SV's work when few samples are flagged (docs/abd-cost.md §1). CPU only: sizing
        # the subset needs the flag count on the host, and on a GPU these small networks are
        # bound by kernel launches, not FLOPs, so a sync is likely to cost more than it saves.
        mask = self.suspicion_mask(x, teacher_logits)
        rows = mask.nonzero().squeeze(1)
        self._last_share = len(rows) / max(len(x), 1)
        self._count(mask)
        if len(rows) == 0:
            return {"sv_maximize_divergence": torch.zeros((), device=x.device)}
        shuffled = self.shuffled_logits(x[rows], grad=True)
        div = divergence_per_sample(teacher_logits[rows], shuffled)
        return {"sv_maximize_divergence": -self.coef * div.mean()}

    def _count(self, mask: torch.Tensor) -> None:
        self.seen += len(mask)
        self._flagged = self._flagged.to(mask.device) + mask.sum()

    @property
    def flagged_share(self) -> float | None:
        """Share of the samples the active vaccine flagged as suspicious, over the ``seen``
        samples of its calls (generator or student form), counted across checkpoints; None
        before any. A diagnostic of how much of the synthesis SV acts on, and of its cost: the
        gradient pass through T̃ runs on the flagged rows only (CPU)."""
        return float(self._flagged) / self.seen if self.seen else None

    def interval_log(self) -> dict[str, float | None]:
        """``{"sv_flagged_share": share flagged since the previous call}`` (None when the active
        vaccine saw no sample in between: pending or off). The data-free loop calls it at every
        log record, so each ``metrics.jsonl`` line shows how much of that interval's synthesis SV
        acted on. Reads the device counter (one host sync per record)."""
        seen, flagged = self.seen, float(self._flagged)
        share = (flagged - self._marks[1]) / (seen - self._marks[0]) if seen > self._marks[0] else None
        self._marks = (seen, flagged)
        return {"sv_flagged_share": share}

    # -- student form (OOD) --------------------------------------------------------------------
    def sample_weighting(self, per_sample: torch.Tensor, x: torch.Tensor,
                         teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """OOD form: ``{"kd": mean over unsuspicious ℓ_i, "sv_push_away": −coef·mean over
        suspicious ℓ_i}`` (``per_sample``: the ``N`` per-sample KD losses, with gradient).
        Plain ``{"kd": mean}`` while SV is pending or off."""
        self._watch(x)
        if not self.active:
            return {"kd": per_sample.mean()}
        mask = self.suspicion_mask(x, teacher_logits)
        self._count(mask)
        suspicious = mask.float()
        kept = 1.0 - suspicious
        kd = (kept * per_sample).sum() / kept.sum().clamp_min(1.0)
        push = (suspicious * per_sample).sum() / suspicious.sum().clamp_min(1.0)
        return {"kd": kd, "sv_push_away": -self.coef * push}

    # -- verification --------------------------------------------------------------------------
    def _watch(self, x: torch.Tensor) -> None:
        if self.status != PENDING:
            return
        self.calls += 1
        if self.calls > self.verify_skip:
            self._cache.append(x.detach().to("cpu", torch.float32))
        if self.calls >= self.verify_batches:
            self.verify()

    @torch.no_grad()
    def cached_divergence(self, device: torch.device | None = None) -> torch.Tensor:
        """D(x) on the cached batches under the current shuffle (float32 ``M``)."""
        device = device or next(self.teacher.parameters()).device
        out = []
        for batch in self._cache:
            x = batch.to(device, torch.float32)
            with self.autocast():
                t = self.teacher(x).float()
            out.append(divergence_per_sample(t, self.shuffled_logits(x)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def verify(self) -> str:
        """Run the verification on the cache now (see the module docstring); returns the status."""
        for trial in range(self.max_trials):
            if trial > 0:
                self.shuffled.reshuffle(self.generator)
            ratio = tail_ratio(self.cached_divergence())
            self.trials.append(ratio)
            if ratio > self.tail_threshold:
                self.status = ACTIVE
                break
        else:
            self.status = OFF
        self._cache = []
        return self.status

    def summary(self) -> dict[str, Any]:
        """Status and verification log, for the run's metrics."""
        return {"status": self.status, "coef": self.coef, "layers": list(self.shuffled.paths),
                "ensemble": self.shuffled.ensemble_size, "tail_ratios": list(self.trials),
                "flagged_share": self.flagged_share, "flag_samples": self.seen}

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"status": self.status, "calls": self.calls, "trials": list(self.trials),
                "perms": self.shuffled.get_perms(), "cache": list(self._cache),
                "rng": self.generator.get_state(), "last_share": self._last_share,
                "seen": self.seen, "flagged": float(self._flagged), "marks": list(self._marks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shuffled.set_perms(state["perms"])
        self.status, self.calls = str(state["status"]), int(state["calls"])
        self.trials = [float(v) for v in state["trials"]]
        self._cache = list(state["cache"])
        self.generator.set_state(state["rng"])
        self._last_share = float(state.get("last_share", 0.0))  # absent in older checkpoints
        # counts absent in older checkpoints: the share then covers the rounds run since
        self.seen, self._flagged = int(state.get("seen", 0)), torch.tensor(float(state.get("flagged", 0.0)))
        marks = state.get("marks", (self.seen, float(self._flagged)))  # older: the next interval starts here
        self._marks = (int(marks[0]), float(marks[1]))


class VaccineWeighting:
    """The OOD (student) form of the vaccine as a ``sample_weighting`` extension that the data-free
    loop checkpoints and logs (it forwards ``state_dict`` and ``interval_log`` to the vaccine)."""

    def __init__(self, vaccine: ShufflingVaccine) -> None:
        self.vaccine = vaccine

    def __call__(self, per_sample: torch.Tensor, x: torch.Tensor,
                 teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.vaccine.sample_weighting(per_sample, x, teacher_logits)

    def state_dict(self) -> dict[str, Any]:
        return self.vaccine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vaccine.load_state_dict(state)

    def interval_log(self) -> dict[str, float | None]:
        return self.vaccine.interval_log()
