"""The detoxification objective: which teacher features RobustKD replaces, and why.

**What is known.** Chen et al. (2024) optimise a "depoisoning mask" with two losses, ``L_ce`` and
``L_f``, built on the observation that backdoored models show abnormal feature variance; the
file names of the reference's shipped masks mention ``CE+fangcha`` (方差, variance),
``mask0.2+Lf`` and ``1-mask0.2+out``. The optimiser itself was never released, so the exact
form, weights and data are unknown (see ``docs/robustkd.md``). This module is kdguard's own
reconstruction; every term's weight is a parameter and both readings below are available.

Notation: stage ``l`` has mask units ``u`` (channels, or channel-positions) with mask values
``M_{l,u} ∈ [0, 1]``; ``T`` is the teacher, ``T_{M,P}`` the detoxified teacher, ``(x, y)`` clean
labelled data, ``τ`` a temperature, ``v̂_{l,u} = Var_clean[a(F_{l,u})] / mean_u Var_clean[a(F_{l,u})]``
the clean variance of the unit relative to its stage (:func:`~.stats.normalized_variance`),
``mean_l`` the mean over stages and ``mean_u`` over a stage's units.

**Fidelity** (both forms): keep the detoxified teacher's clean behaviour,

    L_fid = w_ce · CE(T_{M,P}(x), y) + w_kd · τ² · KL(σ(T(x)/τ) ‖ σ(T_{M,P}(x)/τ)).

**Form "dormant"** (default; kdguard's decision):

    L = L_fid + λ_s · (1 − mean_l mean_u M_{l,u}) + λ_v · mean_l mean_u (M_{l,u} · v̂_{l,u}).

*Why.* With clean data only, the trigger is never seen, so the defence must cut pathways the
clean task does not need. Backdoor units are typically dormant on clean data and fire on
triggered inputs (the insight behind fine-pruning, Liu et al. 2018). Replacing a unit by its
clean mean ``P = μ`` costs clean fidelity in proportion to what the unit carries on clean data,
since ``E‖F̂ − F‖² = M²·Var[F]``, and removes everything the unit would add for a triggered
input. So: the sparsity term pushes every mask towards 1 (mask as much as possible), the
fidelity term refuses masks that change clean predictions, and the variance term charges each
unit its clean variance (the linearised distortion), steering the budget towards dormant,
low-variance units. ``λ_s`` bounds what masking can buy: at the optimum the clean fidelity loss
can rise by at most ``λ_s`` over its unmasked value.

**Form "variance"** (the literal reading of "reduce the feature variance" with ``L_f`` as the
variance of the detoxified features and a mask-size penalty):

    L = L_fid + λ_f · mean_l [ mean_c Var_{n,h,w}(a(F̂_{l,c})) / mean_c Var_clean(a(F_{l,c})) ]
              + λ_m · mean_l mean_u M_{l,u}.

It masks the units that *vary most* on clean data as long as fidelity allows. Because dormant
units carry almost no clean variance, this form gives them no push at all; kdguard's small
synthetic experiments (``tests/robustkd``) show it leaves a planted dormant backdoor channel in
place, which is why "dormant" is the default.

**Adversarial term** (optional, added to either form; ``λ_a > 0`` switches it on). Both forms
see clean data only, so they miss a trigger that drives units the clean task also uses: the
paper-style learned blend (:mod:`.trigger_opt`) is exactly that case (``docs/robustkd.md``). The
term lets the data reveal such a pathway without knowing the trigger: a universal perturbation
``δ ∈ R^{1×C×H×W}``, ``‖δ‖_∞ ≤ ε``, is learned *against* the detoxified teacher while the masks
learn to make it harmless,

    min_{M,P} max_{‖δ‖_∞ ≤ ε}  L + λ_a · τ² · KL(σ(T(x)/τ) ‖ σ(T_{M,P}(clip(x + δ))/τ)),

``clip`` to [0, 1]. A backdoored teacher has a small universal perturbation that moves almost
every input to one class (its trigger, or a blend of it: a blended trigger
``x' = (1 − m)x + m·p`` with ``m ≤ ε`` lies inside the ball), so ``δ`` finds the backdoor and
the masks replace the units it drives, while the fidelity terms keep them off the rest of the
clean task. A clean model has universal adversarial directions of its own at such ``ε``; the
term pushes against those too, which is where its clean-accuracy cost comes from. ``δ`` is updated by one signed-gradient ascent step of
size ``α`` from the same backward pass as the masks ("free" universal adversarial training,
Shafahi et al., AAAI 2020; unlearning a universal perturbation is I-BAU's idea, Zeng et al.,
ICLR 2022). Patch triggers at full intensity lie outside a small ``ε`` ball; the dormant terms
are what removes those.

*Against the teacher* (``adversarial_against="teacher"``). The min-max above lets ``δ`` chase
every universal direction the masked teacher still has, a clean model's own ones included; on
GTSRB that chase cost a clean teacher 10 CA points. The alternative fixes ``δ`` first, on the
**original** teacher, and then asks the masks to defuse that one perturbation:

    δ* = argmax_{‖δ‖_∞ ≤ ε}  E_x τ² · KL(σ(T(x)/τ) ‖ σ(T(clip(x + δ))/τ))
         (``perturbation_epochs`` passes of signed ascent, step ``α``, before the masks learn),
    min_{M,P}  L + λ_a · τ² · KL(σ(T(x)/τ) ‖ σ(T_{M,P}(clip(x + δ*))/τ)).

For a backdoored teacher the strongest small universal perturbation is (a blend of) its
trigger, so ``δ*`` points at the backdoor; for a clean one it is a single universal adversarial
perturbation, which is cheaper to defuse than all of them. The cost is that a backdoor ``δ*``
does not reach stays in place, and a teacher whose trigger is not its strongest universal
direction within ``ε`` is not helped. Measured on GTSRB (``docs/robustkd.md``): a clean teacher
lost 0.2 CA points instead of 10, and a Blend teacher went from 100 % to 1.75 % ASR at −0.4
points (the dormant form alone left 92 %). But the learned blend kept 75 % ASR (min-max: 0 %),
although ``δ*`` alone sent every test image to its target: there, defusing one fixed
perturbation did not generalise to the trigger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import KDGuardError
from ...losses.logit import kd_loss
from .stats import StageStats, normalized_variance

FORMS = ("dormant", "variance")
ADVERSARIAL_AGAINST = ("detoxified", "teacher")


def _check_weight(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not v >= 0 or v == float("inf"):
        raise KDGuardError(f"detox weight {name}={value!r} is not a finite number >= 0",
                           "give a non-negative weight")
    return v


@dataclass
class DetoxObjective:
    """Weights and form of the detoxification loss (equations in the module docstring).

    Args:
        form: ``"dormant"`` (default) or ``"variance"``.
        ce_weight: ``w_ce`` of CE to the clean labels (1).
        kd_weight: ``w_kd`` of ``τ²·KL`` to the original teacher's predictions (1).
        temperature: ``τ`` of the KL term (4, Hinton et al.).
        sparsity_weight: ``λ_s`` (form "dormant"; 1).
        variance_weight: ``λ_v`` (form "dormant"; 0.25), so units with ``v̂ > λ_s/λ_v = 4`` are
            never worth masking on the penalties alone.
        feature_variance_weight: ``λ_f`` (form "variance"; 1).
        mask_size_weight: ``λ_m`` (form "variance"; 0.1).
        adversarial_weight: ``λ_a`` of the adversarial term (0: off; off by default because at
            λ_a 1 it cost the GTSRB teachers 4–10 CA points, a clean one the most, see
            ``docs/robustkd.md``).
        epsilon: ``ε``, the L∞ radius of ``δ`` in [0, 1] pixel units (0.2: the paper's blend
            mask bound).
        adversarial_step: ``α``, the signed-gradient step of ``δ`` per mini-batch (0.02).
        adversarial_against: ``"detoxified"`` (default: ``δ`` attacks the masked teacher at
            every step, the min-max) or ``"teacher"`` (``δ*`` is found on the original teacher
            first and then fixed; module docstring).
        perturbation_epochs: passes over the clean data that search ``δ*`` before the masks
            learn (``adversarial_against="teacher"`` only; 2). ``δ`` needs several times
            ``ε/α`` signed steps to settle: 2 passes are 120 steps on a 7,800-image clean share
            at batch 128, but a tiny set needs more passes (on a 4-step toy, 3 passes left
            ``δ*`` half-formed and the masks fitted to it cost 21 CA points; 10 passes cost none).

    Raises:
        KDGuardError: unknown form, a negative/non-finite weight, τ ≤ 0, or both fidelity
            weights zero, ε / α outside (0, 1], an unknown ``adversarial_against`` or
            ``perturbation_epochs`` < 1.
    """

    form: str = "dormant"
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 4.0
    sparsity_weight: float = 1.0
    variance_weight: float = 0.25
    feature_variance_weight: float = 1.0
    mask_size_weight: float = 0.1
    adversarial_weight: float = 0.0
    epsilon: float = 0.2
    adversarial_step: float = 0.02
    adversarial_against: str = "detoxified"
    perturbation_epochs: int = 2

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise KDGuardError(f"unknown detox objective form {self.form!r}", f"use one of: {', '.join(FORMS)}")
        for name in ("ce_weight", "kd_weight", "sparsity_weight", "variance_weight",
                     "feature_variance_weight", "mask_size_weight", "adversarial_weight"):
            setattr(self, name, _check_weight(name, getattr(self, name)))
        if not self.temperature > 0:
            raise KDGuardError(f"detox temperature {self.temperature!r} must be > 0", "use e.g. 4.0")
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise KDGuardError("both detox fidelity weights (ce_weight, kd_weight) are 0",
                               "keep at least one, or the masks will erase the clean task")
        for name in ("epsilon", "adversarial_step"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise KDGuardError(f"detox {name}={v!r} is outside (0, 1]",
                                   "give it in [0, 1] pixel units, e.g. detox.epsilon=0.2, detox.adversarial_step=0.02")
        if self.adversarial_against not in ADVERSARIAL_AGAINST:
            raise KDGuardError(f"unknown detox adversarial_against {self.adversarial_against!r}",
                               f"use one of: {', '.join(ADVERSARIAL_AGAINST)}")
        if isinstance(self.perturbation_epochs, bool) or not isinstance(self.perturbation_epochs, int) \
                or self.perturbation_epochs < 1:
            raise KDGuardError(f"detox perturbation_epochs {self.perturbation_epochs!r} is not a positive integer",
                               "set it to e.g. 2")

    @property
    def needs_features(self) -> bool:
        """Whether :meth:`__call__` reads the detoxified stage features (form "variance")."""
        return self.form == "variance"

    @property
    def adversarial(self) -> bool:
        """Whether the adversarial term is on (the loop must then pass ``adversarial_logits``)."""
        return self.adversarial_weight > 0

    @property
    def fixed_perturbation(self) -> bool:
        """Whether ``δ`` is searched on the original teacher first and then held fixed."""
        return self.adversarial and self.adversarial_against == "teacher"

    def __call__(self, detox_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                 labels: torch.Tensor | None, masks: Mapping[str, torch.Tensor],
                 stats: Mapping[str, StageStats], *, granularity: str | None = None,
                 features: Mapping[str, torch.Tensor] | None = None,
                 adversarial_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The named, weighted loss terms (their sum is minimised over ``M`` and ``P``).

        Args:
            detox_logits: ``N×K`` logits of the detoxified teacher (with gradient).
            teacher_logits: ``N×K`` logits of the original teacher (no gradient), needed when
                ``kd_weight > 0``.
            labels: ``N`` int64 clean labels, needed when ``ce_weight > 0``.
            masks: ``{path: M}`` with gradient (``C×1×1`` or ``C×H×W``).
            stats: clean statistics of the same paths (:func:`~.stats.clean_feature_stats`).
            granularity: the masks' granularity (selects ``v̂``); None reads it from each
                mask's shape (``C×1×1`` → "channel", else "element").
            features: ``{path: F̂}`` detoxified features ``N×C×H×W`` (form "variance").
            adversarial_logits: ``N×K`` logits of the detoxified teacher on ``clip(x + δ)``
                (with gradient), needed when ``adversarial_weight > 0``.

        Returns:
            ``{"ce", "kd", "sparsity", "variance"}`` (form "dormant") or ``{"ce", "kd",
            "feature_variance", "mask_size"}`` (form "variance"), plus ``"adversarial"`` when
            ``λ_a > 0``; terms of weight 0 are left out.

        Raises:
            KDGuardError: a needed input is missing, or the masks and statistics do not match.
        """
        losses: dict[str, torch.Tensor] = {}
        if self.ce_weight > 0:
            if labels is None:
                raise KDGuardError("the detox objective's CE term needs labels",
                                   "pass the clean labels or use DetoxObjective(..., ce_weight=0)")
            losses["ce"] = self.ce_weight * F.cross_entropy(detox_logits.float(), labels)
        if self.kd_weight > 0:
            if teacher_logits is None:
                raise KDGuardError("the detox objective's KD term needs the original teacher's logits",
                                   "pass teacher_logits or use DetoxObjective(..., kd_weight=0)")
            losses["kd"] = self.kd_weight * kd_loss(detox_logits, teacher_logits.detach(),
                                                   temperature=self.temperature)
        missing = [p for p in masks if p not in stats]
        if missing or not masks:
            raise KDGuardError(f"no clean statistics for detox stages {missing}",
                               "compute clean_feature_stats for the same paths")
        if self.form == "dormant":
            self._dormant(losses, masks, stats, granularity)
        else:
            self._variance(losses, masks, stats, features)
        if self.adversarial:
            if adversarial_logits is None or teacher_logits is None:
                raise KDGuardError("the detox objective's adversarial term needs the detoxified teacher's "
                                   "logits on x + δ and the original teacher's logits",
                                   "run it through detoxify(), or use DetoxObjective(..., adversarial_weight=0)")
            losses["adversarial"] = self.adversarial_weight * kd_loss(
                adversarial_logits, teacher_logits.detach(), temperature=self.temperature)
        return losses

    def _dormant(self, losses, masks, stats, granularity) -> None:
        mean_mask = torch.stack([m.float().mean() for m in masks.values()]).mean()
        if self.sparsity_weight > 0:
            losses["sparsity"] = self.sparsity_weight * (1.0 - mean_mask)
        if self.variance_weight > 0:
            terms = []
            for path, m in masks.items():
                g = granularity or ("channel" if tuple(m.shape[-2:]) == (1, 1) else "element")
                v = normalized_variance(stats[path], g).to(m.device)
                if v.shape != m.shape:
                    raise KDGuardError(f"mask of stage {path!r} has shape {tuple(m.shape)} but its "
                                       f"statistics give {tuple(v.shape)}",
                                       "use the granularity the masks were built with")
                terms.append((m.float() * v).mean())
            losses["variance"] = self.variance_weight * torch.stack(terms).mean()

    def _variance(self, losses, masks, stats, features) -> None:
        if self.feature_variance_weight > 0:
            if features is None or any(p not in features for p in masks):
                raise KDGuardError("the 'variance' detox objective needs the detoxified features",
                                   "attach the detoxification with detox.attach(model, record=True)")
            terms = []
            for path in masks:
                f = features[path].float()
                if stats[path].activation == "relu":  # same a(·) as the clean statistics
                    f = f.clamp_min(0)
                var_now = f.transpose(0, 1).flatten(1).var(dim=1, unbiased=False).mean()
                var_clean = stats[path].var_channel.mean().to(f.device)
                terms.append(var_now / (var_clean + 1e-8))
            losses["feature_variance"] = self.feature_variance_weight * torch.stack(terms).mean()
        if self.mask_size_weight > 0:
            mean_mask = torch.stack([m.float().mean() for m in masks.values()]).mean()
            losses["mask_size"] = self.mask_size_weight * mean_mask
