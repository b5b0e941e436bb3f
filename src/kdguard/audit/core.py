"""The whole audit of one classifier on a small clean set: reachability, shuffle test, verdict.

:func:`audit_model` runs, for every class ``k``:

1. the mask/pattern trigger search (Neural Cleanse, :func:`.reachability.reverse_trigger`);
2. the smallest universal L∞ perturbation reaching ``k`` (:func:`.reachability.additive_trigger`),
   dense (one value per pixel) and smooth (bilinear from a coarse grid, ``AdditiveSearch.grid``);
3. the shuffle test (:class:`.shuffle_check.ShuffleProbe`): the share of the other classes' clean
   images that the shuffled ensembles send to ``k`` (the *collapse* share), and the agreement and
   lift of the images stamped with ``k``'s mask trigger (recorded, not voted on);

then the three MAD anomaly indices over the classes (mask, additive, smooth), the collapse signal
and the verdict (:func:`.verdict.decide`).

The clean set is capped at ``max_images`` images (stratified by class, seeded) because the cost
is ``K`` searches over it: a universal trigger is found on a few hundred images as well as on
thousands, and the held-out success shows whether it generalises.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import KDGuardError
from .anomaly import DEFAULT_THRESHOLD, anomaly_index
from .reachability import (AdditiveSearch, AdditiveTrigger, ClassTrigger, TriggerSearch, _device, _Frozen,
                           _num_classes, additive_trigger, check_clean_set, reverse_trigger)
from .shuffle_check import ShuffleCheck, ShuffleProbe, ShuffleStats
from .verdict import Verdict, decide

log = logging.getLogger(__name__)

#: the smooth search's control grid: 16×16 values per channel keep SIG's sinusoid (6 periods on
#: 32 px) and low-frequency patterns expressible, and most of a natural class's adversarial texture out
SMOOTH_GRID = 16

#: the mask search's defaults for the audit: the release's schedule, fewer epochs (each class's
#: smallest mask settles well within 30 passes over ~1,000 images; early stopping ends most sooner)
AUDIT_SEARCH = TriggerSearch(epochs=30)


@dataclass(frozen=True)
class AuditSettings:
    """What :func:`audit_model` runs.

    Attributes:
        search: the mask/pattern search (:class:`TriggerSearch`).
        additive: the additive L∞ search (:class:`AdditiveSearch`); ``None`` skips it.
        smooth: the smooth additive search (:class:`AdditiveSearch` with ``grid`` > 0, e.g.
            ``AdditiveSearch(grid=SMOOTH_GRID)``); ``None`` (default) skips it. Opt-in: with the
            dense search's budget (0.25) most of GTSRB's 43 classes sit at the cap in the smooth
            form, and the MAD index then flags natural classes (``docs/audit.md``).
        shuffle: the shuffle test (:class:`ShuffleCheck`); ``None`` skips it.
        max_images: clean images used at most (stratified by class); ``0`` = all.
        threshold: anomaly index above which a class is a signal (Neural Cleanse: 2).
        votes: signals a class needs for the verdict ``backdoored`` (see :mod:`.verdict`).
        seed: seeds the image cap, every class's search (``seed + k``) and the shuffles.
    """

    search: TriggerSearch = AUDIT_SEARCH
    additive: AdditiveSearch | None = field(default_factory=AdditiveSearch)
    smooth: AdditiveSearch | None = None
    shuffle: ShuffleCheck | None = field(default_factory=ShuffleCheck)
    max_images: int = 1000
    threshold: float = DEFAULT_THRESHOLD
    votes: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.max_images) < 0:
            raise KDGuardError(f"max_images {self.max_images!r} must be >= 0", "give 0 (all) or a cap such as 1000")
        if self.smooth is not None and not self.smooth.grid:
            raise KDGuardError("the smooth search needs a control grid of 2 or more values per side",
                               f"pass AdditiveSearch with a grid of {SMOOTH_GRID} (audit.smooth_grid)")
        signals = 1 + (self.additive is not None) + (self.smooth is not None) + (self.shuffle is not None)
        if not 1 <= int(self.votes) <= signals:
            raise KDGuardError(f"votes {self.votes!r} is outside [1, {signals}] for the checks enabled",
                               f"give votes between 1 and {signals}")


@dataclass
class ClassFinding:
    """Everything the audit found about one class.

    Attributes:
        target: the class.
        trigger: the mask/pattern trigger (``mask`` ``1×H×W``, ``pattern`` ``C×H×W``, ``l1`` in pixels).
        additive: the additive trigger (``delta`` ``C×H×W``, ``eps`` in ``[0, 1]`` pixel units), or None.
        smooth: the smooth additive trigger (same fields), or None.
        shuffle: shuffle agreement of the other classes' images stamped with :attr:`trigger`, or None.
        index: the class's ``mask``, ``additive`` and ``smooth`` anomaly indices and its
            ``shuffle`` collapse share (absent for a skipped check).
    """

    target: int
    trigger: ClassTrigger
    additive: AdditiveTrigger | None
    shuffle: ShuffleStats | None
    smooth: AdditiveTrigger | None = None
    index: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        t = self.trigger
        out: dict[str, Any] = {
            "class": self.target,
            "mask_l1": t.l1, "mask_success": t.success, "mask_reached": t.reached, "mask_epochs": t.epochs,
        }
        if self.additive is not None:
            out.update(additive_eps=self.additive.eps, additive_success=self.additive.success,
                       additive_reached=self.additive.reached)
        if self.smooth is not None:
            out.update(smooth_eps=self.smooth.eps, smooth_success=self.smooth.success,
                       smooth_reached=self.smooth.reached)
        if self.shuffle is not None:
            out.update(shuffle_agreement=self.shuffle.agreement, shuffle_divergence=self.shuffle.divergence,
                       shuffle_target_rate=self.shuffle.target_rate, shuffle_lift=self.shuffle.lift)
        out["index"] = {k: _finite(v) for k, v in self.index.items()}
        return out


@dataclass
class AuditResult:
    """The audit of one model.

    Attributes:
        classes: one :class:`ClassFinding` per class, in class order.
        verdict: the conclusion (:class:`Verdict`).
        clean_accuracy: the model's accuracy on the clean images used (a sanity check: a model
            far below its claimed accuracy is the wrong model or the wrong input convention).
        clean_shuffle: shuffle agreement on the clean images (None without the shuffle test).
        shuffled_layers: module paths the shuffle test permuted.
        n_images: clean images used.
        seconds: wall time per stage (``mask``, ``additive``, ``smooth``, ``shuffle``) and ``total``.
        settings: the settings, as a plain dict.
    """

    classes: list[ClassFinding]
    verdict: Verdict
    clean_accuracy: float
    clean_shuffle: ShuffleStats | None
    shuffled_layers: list[str]
    n_images: int
    seconds: dict[str, float]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (``audit.json``): verdict, targets, per-class numbers, timings."""
        return {
            "verdict": self.verdict.verdict,
            "suspected_targets": list(self.verdict.targets),
            "signals": {str(k): v for k, v in self.verdict.signals.items()},
            "clean_accuracy": self.clean_accuracy,
            "clean_shuffle": self.clean_shuffle.to_dict() if self.clean_shuffle is not None else None,
            "shuffled_layers": self.shuffled_layers,
            "n_images": self.n_images,
            "classes": [c.to_dict() for c in self.classes],
            "seconds": self.seconds,
            "settings": self.settings,
        }


def _finite(v: float) -> float | str:
    # JSON has no infinity: keep the sign in words
    if v == float("inf"):
        return "inf"
    if v == float("-inf"):
        return "-inf"
    return v


def cap_images(images: torch.Tensor, labels: torch.Tensor, max_images: int,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``max_images`` of the images, the same share of every class (seeded), in their order."""
    if max_images <= 0 or len(images) <= max_images:
        return images, labels
    gen = torch.Generator().manual_seed(seed)
    share = max_images / len(images)
    keep = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        k = max(1, int(round(share * len(members))))
        keep.append(members[torch.randperm(len(members), generator=gen)[:k]])
    idx = torch.cat(keep).sort().values
    return images[idx], labels[idx]


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    hits = 0
    for start in range(0, len(x), 256):
        hits += int((net(x[start:start + 256].to(device)).argmax(1).cpu() == y[start:start + 256]).sum())
    return hits / len(x)


def audit_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                settings: AuditSettings = AuditSettings(),
                device: torch.device | str | None = None) -> AuditResult:
    """Audit ``model`` for a backdoor with a small clean labelled set.

    Args:
        model: classifier taking float ``N×C×H×W`` in ``[0, 1]`` and returning ``N×K`` logits
            (``K ≥ 2``); used frozen in eval mode, its mode and flags restored afterwards.
        images: clean ``N×C×H×W`` images, uint8 (0–255) or float (0–1), of at least 2 classes.
        labels: ``N`` integer labels.
        settings: the checks and their budgets.
        device: where to compute (default: the model's device; the model is not moved).

    Returns:
        The :class:`AuditResult` (per-class triggers and indices, the verdict, timings).

    Raises:
        KDGuardError: bad images or labels (:func:`.reachability.check_clean_set`: wrong shape or
            range, one class only), a model with fewer than 2 outputs, a label outside the model's
            classes, or a model the shuffle test cannot shuffle.
    """
    t_start = time.perf_counter()
    x = check_clean_set(images, labels)
    x, y = cap_images(x, labels, settings.max_images, settings.seed)
    if y.unique().numel() < 2:
        raise KDGuardError("the capped clean set holds one class only", "raise max_images or pass more images")
    dev = _device(model, device)
    seconds = {"mask": 0.0, "additive": 0.0, "smooth": 0.0, "shuffle": 0.0}
    with _Frozen(model) as net:
        k_count = _num_classes(net, x.to(dev))
        if k_count < 2:
            raise KDGuardError(f"the model has {k_count} output(s); an audit compares classes",
                               "audit a classifier with 2 or more classes")
        if int(y.max()) >= k_count or int(y.min()) < 0:
            raise KDGuardError(f"clean labels reach {int(y.max())} but the model has {k_count} classes",
                               "pass the clean share of the teacher's own dataset")
        clean_acc = _accuracy(net, x, y, dev)
        probe = clean_stats = None
        base: list[float] = []
        if settings.shuffle is not None:
            t = time.perf_counter()
            probe = ShuffleProbe(net, x[:8].to(dev), settings.shuffle, seed=settings.seed)
            clean_stats = probe.measure(x)
            base = probe.base_rates(x, y, k_count)
            seconds["shuffle"] += time.perf_counter() - t
        findings = []
        for k in range(k_count):
            if int((y != k).sum()) < 2:
                raise KDGuardError(f"fewer than 2 clean images of classes other than {k}",
                                   "pass clean images of at least 2 classes")
            t = time.perf_counter()
            trig = reverse_trigger(net, x, y, k, search=settings.search, device=dev,
                                   generator=torch.Generator().manual_seed(settings.seed + k))
            seconds["mask"] += time.perf_counter() - t
            add = None
            if settings.additive is not None:
                t = time.perf_counter()
                add = additive_trigger(net, x, y, k, search=settings.additive, seed=settings.seed + k, device=dev)
                seconds["additive"] += time.perf_counter() - t
            smooth = None
            if settings.smooth is not None:
                t = time.perf_counter()
                smooth = additive_trigger(net, x, y, k, search=settings.smooth, seed=settings.seed + k, device=dev)
                seconds["smooth"] += time.perf_counter() - t
            stats = None
            if probe is not None:
                t = time.perf_counter()
                others = x[y != k]
                stamped = (1 - trig.mask) * others + trig.mask * trig.pattern
                stats = probe.measure(stamped, target=k, base_rate=base[k])
                seconds["shuffle"] += time.perf_counter() - t
            findings.append(ClassFinding(k, trig, add, stats, smooth))
            log.info("[audit] class %d/%d: mask |m|=%.1f px (success %.2f)%s%s%s", k + 1, k_count, trig.l1,
                     trig.success, f", additive eps={add.eps:.4f}" if add is not None else "",
                     f", smooth eps={smooth.eps:.4f}" if smooth is not None else "",
                     f", shuffle agreement {stats.agreement:.2f}" if stats is not None else "")
    indices: dict[str, list[float]] = {"mask": anomaly_index([f.trigger.l1 for f in findings])}
    # budgets lie on the bisection's grid: one grid step is the least spread that counts
    if settings.additive is not None:
        indices["additive"] = anomaly_index([f.additive.eps for f in findings],
                                            min_spread=settings.additive.resolution)
    if settings.smooth is not None:
        indices["smooth"] = anomaly_index([f.smooth.eps for f in findings], min_spread=settings.smooth.resolution)
    signals: dict[str, list[bool]] = {}
    if probe is not None:
        # the shuffle signal is the collapse itself: the shuffled ensembles send most clean images
        # of the other classes to one class (see .shuffle_check); recorded as that share
        indices["shuffle"] = [float(f.shuffle.target_rate - f.shuffle.lift) for f in findings]
        signals["shuffle"] = [v > settings.shuffle.collapse for v in indices["shuffle"]]
    for f in findings:
        f.index = {name: values[f.target] for name, values in indices.items()}
    verdict = decide(indices, threshold=settings.threshold, votes=settings.votes, signals=signals)
    seconds["total"] = time.perf_counter() - t_start
    return AuditResult(classes=findings, verdict=verdict, clean_accuracy=clean_acc, clean_shuffle=clean_stats,
                       shuffled_layers=probe.paths if probe is not None else [], n_images=len(x),
                       seconds=seconds, settings=_settings_dict(settings))


def _settings_dict(s: AuditSettings) -> dict[str, Any]:
    return asdict(s)
