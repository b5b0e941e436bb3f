"""The general distiller: any weighted combination of distillation terms, on tapped features.

Example::

    terms = {"at": (1000.0, ATTerm()), "kd": (1.0, KDTerm(temperature=4))}
    d = FeatureDistiller(student, teacher, ["layer1", "layer2", "layer3"],
                         ["layer1", "layer2", "layer3"], terms)
    logits, losses = d(x, y)        # losses: {"ce": ..., "at": ..., "kd": ...}, all weighted
    sum(losses.values()).backward()

Usually built by :func:`kdguard.distill.build_distiller` from a method name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDGuardError
from .base import Distiller
from .probe import GuardedTaps
from .terms.base import DistillTerm
from .terms.logit import KDTerm

RESERVED_NAMES = ("ce",)


def _check_weight(name: str, weight: float) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w) or w < 0:
        raise KDGuardError(f"weight {weight!r} of loss term {name!r} is not a finite number >= 0",
                           "give a non-negative weight, e.g. 1.0")
    return w


def _unique(paths: list[str]) -> list[str]:
    return list(dict.fromkeys(paths))


class FeatureDistiller(Distiller):
    """Student + frozen teacher + weighted distillation terms.

    One training step runs the teacher once (eval mode, ``no_grad``, features detached) and the
    student once (with gradient), each with forward hooks on the union of the paths the terms
    read. Hooks are registered once, here, and the recorded features are dropped after each step.

    Args:
        student, teacher: models taking ``N×C×H×W`` float images in [0, 1], returning logits.
        student_paths, teacher_paths: default module paths, aligned pairwise, for feature terms
            whose own ``student_paths``/``teacher_paths`` are ``None``.
        terms: ``{name: (weight, term)}``; ``name`` is the key of the term's loss in the returned
            dict (a Python identifier, not ``"ce"``), ``weight`` a finite float ≥ 0 multiplying it.
        ce_weight: weight of the cross-entropy with the labels (skipped when 0 or when no labels
            are passed, e.g. for unlabelled or proxy data).
        kd_weight, temperature: convenience for adding Hinton's KD as a term named ``"kd"``.

    Forward (training): ``distiller(x, y=None, index=None)`` →
    ``(student_logits N×K, {"ce": ..., name: weight · term, ...})``; ``index`` (the dataset
    positions of the batch) is needed by CRD. In eval mode it returns the student's logits only.

    Raises:
        KDGuardError: bad names/weights, path lists that do not pair up, a term needing
            labels/indices called without them, or a tapped feature overwritten in place.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_paths: Sequence[str] = (),
                 teacher_paths: Sequence[str] = (),
                 terms: Mapping[str, tuple[float, DistillTerm]] | None = None, *,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, temperature: float = 4.0) -> None:
        super().__init__(student, teacher)
        terms = dict(terms or {})
        if _check_weight("kd", kd_weight) > 0:
            if "kd" in terms:
                raise KDGuardError("a term named 'kd' is given and kd_weight is set too",
                                   "use only one of them")
            terms["kd"] = (kd_weight, KDTerm(temperature=temperature))
        self.ce_weight = _check_weight("ce", ce_weight)
        self.weights: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        self._paths: dict[str, tuple[list[str], list[str]]] = {}
        for name, spec in terms.items():
            self._add_term(name, spec, list(student_paths), list(teacher_paths))
        if not self.terms and self.ce_weight == 0:
            raise KDGuardError("the distiller has no loss terms and ce_weight is 0",
                               "add at least one term or a positive ce_weight")
        s_union = _unique([p for s, _ in self._paths.values() for p in s])
        t_union = _unique([p for _, t in self._paths.values() for p in t])
        self._s_taps = GuardedTaps(student, s_union) if s_union else None
        self._t_taps = GuardedTaps(teacher, t_union, detach=True) if t_union else None
        self._closed = False

    def _add_term(self, name: str, spec: tuple[float, DistillTerm], student_paths: list[str],
                  teacher_paths: list[str]) -> None:
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_NAMES:
            raise KDGuardError(f"loss term name {name!r} is not usable",
                               "use a Python identifier other than 'ce', e.g. 'at'")
        try:
            weight, term = spec
        except (TypeError, ValueError):
            raise KDGuardError(f"loss term {name!r} must be given as (weight, term)",
                               "e.g. {'at': (1000.0, ATTerm())}") from None
        if not isinstance(term, DistillTerm):
            raise KDGuardError(f"loss term {name!r} is a {type(term).__name__}, not a DistillTerm",
                               "wrap the loss in a kdguard.distill.terms.DistillTerm subclass")
        if term.uses_features:
            s = term.student_paths if term.student_paths is not None else student_paths
            t = term.teacher_paths if term.teacher_paths is not None else teacher_paths
            if not s or len(s) != len(t):
                raise KDGuardError(f"loss term {name!r} reads {len(s)} student and {len(t)} teacher "
                                   "feature paths", "give the same, non-zero number of student and "
                                   "teacher paths (aligned pairwise)")
        else:
            s, t = [], []
        self.weights[name] = _check_weight(name, weight)
        self.terms[name] = term
        self._paths[name] = (list(s), list(t))

    # -- API ----------------------------------------------------------------------------------
    @property
    def needs_index(self) -> bool:
        """Whether the training forward needs ``index`` (the dataset positions of the batch)."""
        return any(t.needs_index for t in self.terms.values())

    @property
    def needs_labels(self) -> bool:
        return any(t.needs_labels for t in self.terms.values())

    def paths(self, name: str) -> tuple[list[str], list[str]]:
        """The (student, teacher) paths that term ``name`` reads."""
        if name not in self._paths:
            raise KDGuardError(f"no loss term named {name!r}", f"use one of: {', '.join(self._paths)}")
        return self._paths[name]

    def on_epoch_start(self, epoch: int) -> None:
        """Tell every term that 0-based epoch ``epoch`` starts (schedules such as DKD's warm-up).

        :class:`kdguard.train.Trainer` calls it before each epoch, also the one a resumed run
        starts at; a custom loop must call it too.
        """
        for term in self.terms.values():
            term.on_epoch_start(epoch)

    def set_weight(self, name: str, weight: float) -> None:
        """Change a term's weight (``"ce"`` for the cross-entropy), e.g. for a warm-up schedule."""
        if name == "ce":
            self.ce_weight = _check_weight(name, weight)
        elif name in self.weights:
            self.weights[name] = _check_weight(name, weight)
        else:
            raise KDGuardError(f"no loss term named {name!r}",
                               f"use 'ce' or one of: {', '.join(self.weights)}")

    def close(self) -> None:
        """Remove the forward hooks from student and teacher (the distiller cannot train after)."""
        for taps in (self._s_taps, self._t_taps):
            if taps is not None:
                taps.remove()
        self._s_taps = self._t_taps = None
        self._closed = True

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, index: torch.Tensor | None = None):
        """Training: ``(student_logits, {name: weighted scalar})``. Eval: student logits only."""
        if not self.training:
            return self.student(x)
        return self.forward_train(x, y, index)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor | None, index: torch.Tensor | None = None):
        for name, term in self.terms.items():
            if term.needs_index and index is None:
                raise KDGuardError(f"loss term {name!r} needs the dataset indices of the batch",
                                   "call the distiller as distiller(x, y, index)")
            if term.needs_labels and y is None:
                raise KDGuardError(f"loss term {name!r} needs the labels of the batch",
                                   "call the distiller as distiller(x, y) with labels")
            if term.uses_features and self._closed:
                raise KDGuardError("the distiller's hooks were removed by close()",
                                   "build a new distiller")
        try:
            with torch.no_grad():
                t_logits, t_feats = self._t_taps(x) if self._t_taps else (self.teacher(x), {})
            s_logits, s_feats = self._s_taps(x) if self._s_taps else (self.student(x), {})
            t_logits = t_logits.detach()
            losses: dict[str, torch.Tensor] = {}
            if self.ce_weight > 0 and y is not None:
                losses["ce"] = self.ce_weight * F.cross_entropy(s_logits.float(), y)
            for name, term in self.terms.items():
                s_paths, t_paths = self._paths[name]
                value = term([s_feats[p] for p in s_paths], [t_feats[p] for p in t_paths],
                             s_logits=s_logits, t_logits=t_logits, y=y, index=index)
                losses[name] = self.weights[name] * value
        finally:
            self._clear()
        return s_logits, losses

    def _clear(self) -> None:
        for taps in (self._s_taps, self._t_taps):
            if taps is not None:
                taps.clear()

    def extra_repr(self) -> str:
        weights = ", ".join(f"{k}={v:g}" for k, v in {"ce": self.ce_weight, **self.weights}.items())
        return f"weights: {weights}"
