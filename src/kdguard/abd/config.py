"""The ``abd`` section of a data-free job: which ABD defences run and their settings.

:class:`ABDConfig` is composed into the data-free job by :mod:`kdguard.jobs.datafree` (the key
``abd.mode=full`` of ``kdguard distill-datafree``); :func:`validate_abd` checks it before the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import KDGuardError, check_choice, check_positive


@dataclass
class ShufflingVaccineConfig:
    """ABD's Shuffling Vaccine (Hong et al. 2023, §4.1; ABD ``syn_vaccine.py``), see ``docs/abd.md``."""

    coef: float = 0.1                      # --shuf_teacher / --shufl_coef (all shipped sweeps)
    ensemble: int = 3                      # --n_shuf_ens: shuffled copies whose logits are averaged
    layers: int = 5                        # --n_shuf_layer: last k convolutions by execution order
                                           # (negative: the first |k| from the input side)
    form: str = "auto"                     # auto | generator (regulariser on synthesis) | student
                                           # (OOD: KD on unsuspicious, push away on suspicious);
                                           # auto = student for ood, generator otherwise
    shuffle_grad: bool = True              # gradients flow through the shuffled teacher
                                           # (reference default; false = --no_shuf_grad, cheaper)
    verify_batches: int = 0                # --pseudo_test_batches (CIFAR-10 sweeps 0, GTSRB 50);
                                           # 0 = switch SV on at once
    verify_skip: int = 10                  # the first batches are not cached (reference: 10)
    tail_threshold: float = 0.02           # tail ratio (log10 KL < mean − 3σ) needed to switch on
    max_trials: int = 8                    # re-shuffles tried before SV stays off


@dataclass
class SelfRetrospectionConfig:
    """ABD's Self-Retrospection (Hong et al. 2023, §4.2; ABD ``unlearn.py``), see ``docs/abd.md``."""

    phase: float = 0.02                    # share of the round budget at the end that runs SR
                                           # (reference: ZSKT GTSRB 2 %; ZSKT CIFAR-10 resumes at
                                           # pb79399/79599 of 8e4 = 0.75/0.5 %; CMI 1-1.5 %)
    lr: float = 5e-4                       # learning rate reset at the phase start (--sup_resume_lr),
                                           # cosine to 0 over the phase
    reset_optimizer: bool = True           # fresh optimiser state at the phase start (ZSKT resume)
    perturb_model: str = "teacher"         # teacher | student: the model δ is synthesised against
                                           # (ABD sweeps: teacher; ZSKT code default: student)
    search: str = "kl"                     # kl: δ maximises KL(M(x) ‖ M(x+δ)) − λ‖δ‖² (the reference) |
                                           # sparse: then, towards the class that δ sends the batch
                                           # to, δ minimises CE(M(x+δ), t) + l1‖δ‖₁ (kdguard's; a
                                           # trigger-sized δ instead of a dense class pattern,
                                           # docs/abd-results.md §4); no hypergradient
    l1: float = 0.01                       # sparse search: weight of ‖δ‖₁ (normalised units)
    unlearn: str = "kl"                    # kl: the divergence from the clean to the perturbed
                                           # output (the reference) | logit: the squared distance
                                           # of the two centred logit vectors, gradient through
                                           # both: blind to a shift of one class's logit, so the
                                           # student cannot unlearn by dropping the target class
    sparse_steps: int = 50                 # sparse search: Adam steps (lr inner_lr)
    inner_steps: int = 10                  # --inner_round: Adam steps on δ
    inner_lr: float = 0.1                  # --pert_lr (δ in normalised input units, as the reference)
    l2: float = 1e-3                       # λ of the ‖δ‖² term of the inner problem
    share: float = 0.02                    # share of each batch that gets δ (--hg_out_portion) ...
    min_count: int = 8                     # ... but at least this many samples (the reference
                                           # rounds 2 % of 128 down to 2, and to 0 below 50)
    weight: float = 1.0                    # weight of the unlearning term
    divergence: str = "kl"                 # kl: KL at τ = 1 summed over classes | method: the
                                           # method's own KD divergence, as the references (ZSKT:
                                           # τ 1, ÷K, i.e. K× weaker; CMI: τ 20 with τ²)
    outer_reduction: str = "batch"         # batch: sum over the perturbed samples ÷ batch size
                                           # (the reference's batchmean) | perturbed: mean over
                                           # them (N/|B| times stronger; too strong at lr 5e-4 in
                                           # kdguard's measurements, docs/abd.md)
    detach_clean: bool = True              # clean student logits detached in the outer loss (ZSKT
                                           # code; the CMI code keeps their gradient)
    hypergradient: bool = True             # implicit hypergradient through δ*(θ) (--use_hg)
    hypergradient_steps: int = 5           # K fixed-point iterations
    hypergradient_step_size: float = 0.1   # step α of the inner gradient-descent map Φ
    amp: bool = False                      # the unlearning and hypergradient passes under the run's
                                           # bf16 autocast (~1.5× faster on CPU; hypergradient within
                                           # ~3 % of float32's) instead of float32
    nchw: bool = True                      # on CPU, SR's passes through a channels_last student run
                                           # in NCHW (1.2-1.3x faster there; no effect on CUDA)
    from_audit: Optional[str] = None       # a `kdguard audit` run directory: unlearn its
                                           # reconstructed trigger (stamped on the chosen samples)
                                           # instead of searching δ; no hypergradient (the trigger
                                           # is fixed, not an inner solution)
    audit_class: Optional[int] = None      # the class whose trigger (null: the audit's first suspect)
    oracle_trigger: bool = False           # unlearn the teacher's own recorded trigger instead of
                                           # searching δ (an oracle for analysis: what SR could do
                                           # if its search found the real trigger; not a defence)
    audit_reference: str = "student"       # what stamped samples are pulled to: student (the
                                           # student's clean output, SR's term) | teacher (the
                                           # teacher's clean output: distillation on stamped copies)
    modules: Optional[list[str]] = None    # module paths of the student (e.g. [block1, block2])
                                           # whose parameters take the unlearning term's gradient
                                           # (direct and implicit); the distillation losses still
                                           # train every parameter. null: all (the reference)


@dataclass
class ABDConfig:
    """ABD (Hong et al., ICML 2023) as a plug-in of every data-free method: ``abd.mode``."""

    mode: str = "off"                      # off | sv | sr | full (sv + sr)
    sv: ShufflingVaccineConfig = field(default_factory=ShufflingVaccineConfig)
    sr: SelfRetrospectionConfig = field(default_factory=SelfRetrospectionConfig)

    @property
    def uses_sv(self) -> bool:
        return self.mode in ("sv", "full")

    @property
    def uses_sr(self) -> bool:
        return self.mode in ("sr", "full")


def validate_abd(cfg: ABDConfig) -> None:
    """Check the ``abd`` section (see :class:`ABDConfig`).

    Raises:
        KDGuardError: naming the first bad setting and the fix.
    """
    check_choice("abd.mode", cfg.mode, ("off", "sv", "sr", "full"))
    sv, sr = cfg.sv, cfg.sr
    check_choice("abd.sv.form", sv.form, ("auto", "generator", "student"))
    check_positive("abd.sv.coef", sv.coef, allow_zero=True)
    check_positive("abd.sv.ensemble", sv.ensemble)
    if sv.layers == 0:
        raise KDGuardError("abd.sv.layers 0 shuffles nothing",
                           "give the number of last convolutions to shuffle, e.g. 5")
    for label, value in (("abd.sv.verify_batches", sv.verify_batches), ("abd.sv.verify_skip", sv.verify_skip),
                         ("abd.sv.max_trials", sv.max_trials), ("abd.sv.tail_threshold", sv.tail_threshold)):
        check_positive(label, value, allow_zero=True)
    if sv.verify_batches and sv.verify_batches <= sv.verify_skip:
        raise KDGuardError(f"abd.sv.verify_batches {sv.verify_batches} leaves no batch after the "
                           f"{sv.verify_skip} skipped ones",
                           "give abd.sv.verify_batches > abd.sv.verify_skip, e.g. abd.sv.verify_batches=50")
    if not 0.0 < sr.phase <= 1.0:
        raise KDGuardError(f"abd.sr.phase {sr.phase!r} is not in (0, 1]",
                           "give the share of the budget at the end that runs SR, e.g. 0.02")
    if not 0.0 < sr.share <= 1.0:
        raise KDGuardError(f"abd.sr.share {sr.share!r} is not in (0, 1]", "give e.g. 0.02")
    check_choice("abd.sr.perturb_model", sr.perturb_model, ("teacher", "student"))
    check_choice("abd.sr.outer_reduction", sr.outer_reduction, ("perturbed", "batch"))
    check_choice("abd.sr.divergence", sr.divergence, ("kl", "method"))
    check_choice("abd.sr.search", sr.search, ("kl", "sparse"))
    check_choice("abd.sr.unlearn", sr.unlearn, ("kl", "logit"))
    check_positive("abd.sr.l1", sr.l1, allow_zero=True)
    check_positive("abd.sr.sparse_steps", sr.sparse_steps)
    check_choice("abd.sr.audit_reference", sr.audit_reference, ("student", "teacher"))
    for label, value in (("abd.sr.lr", sr.lr), ("abd.sr.inner_lr", sr.inner_lr),
                         ("abd.sr.hypergradient_step_size", sr.hypergradient_step_size)):
        check_positive(label, value)
    if sr.from_audit is not None and not cfg.uses_sr:
        raise KDGuardError(f"abd.sr.from_audit is set but abd.mode={cfg.mode} runs no SR",
                           "set abd.mode=sr (or full) to unlearn the audit's trigger")
    if sr.oracle_trigger and not cfg.uses_sr:
        raise KDGuardError(f"abd.sr.oracle_trigger is set but abd.mode={cfg.mode} runs no SR",
                           "set abd.mode=sr (or full)")
    if sr.oracle_trigger and sr.from_audit is not None:
        raise KDGuardError("abd.sr.oracle_trigger and abd.sr.from_audit both name the trigger to unlearn",
                           "keep one of them")
    if sr.audit_class is not None and sr.from_audit is None:
        raise KDGuardError("abd.sr.audit_class is set without abd.sr.from_audit",
                           "set abd.sr.from_audit=AUDIT_DIR too, or drop abd.sr.audit_class")
    check_positive("abd.sr.audit_class", sr.audit_class, allow_zero=True)
    if sr.modules is not None and (not isinstance(sr.modules, (list, tuple)) or not sr.modules
                                   or not all(isinstance(m, str) and m for m in sr.modules)):
        raise KDGuardError(f"abd.sr.modules {sr.modules!r} is not a non-empty list of module paths",
                           "give e.g. abd.sr.modules=[block1,block2], or null for every parameter")
    for label, value in (("abd.sr.inner_steps", sr.inner_steps), ("abd.sr.min_count", sr.min_count),
                         ("abd.sr.l2", sr.l2), ("abd.sr.weight", sr.weight),
                         ("abd.sr.hypergradient_steps", sr.hypergradient_steps)):
        check_positive(label, value, allow_zero=True)
