"""RobustKD's robust distillation: OFD from the *detoxified* teacher, plus CE on clean labels.

Reference (``Xming-Z/RobustKD``, ``distiller.py`` / ``train_with_distillation.py``), built on Heo
et al., "A Comprehensive Overhaul of Feature Distillation" (ICCV 2019):

    L = w_ce · CE(S(x̃), y) + w_ofd · (1/(1000·B)) · Σ_i d_p(σ_m(T̂_i(x)), r_i(S_i(x̃))) / 2^{n−1−i}

* ``T̂_i``: pre-ReLU features of the teacher *with the detoxification hooks attached*
  (:class:`~.detox.FeatureDetox`), so every distilled target is a detoxified feature;
* ``r_i``: OFD connectors (Conv1×1 + BN), ``σ_m``: teacher-BN margins, ``d_p``: partial L2, the
  stage weights and the ``1000·B`` normalisation: :class:`kdguard.distill.terms.OFDTerm`;
* ``x̃``: the student's input, optionally with salt-and-pepper noise (:func:`salt_and_pepper`;
  the reference's helper calls ``.copy()`` on a CUDA tensor and crashes, so its density is
  unknown in practice; its default argument is 10 %). The teacher always sees the clean ``x``.

Fixes over the reference: the teacher stays in eval mode (the reference trains with
``t_net.train()``, so BN statistics drift), and the noise works on any device.

``method="kd"`` swaps the OFD term for Hinton's logit KD against the same (detoxified) teacher;
kdguard uses it for the KD baselines of the ``robustkd`` suite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...distill.base import Distiller
from ...distill.probe import GuardedTaps, feature_shapes
from ...distill.terms import OFDTerm, teacher_margins
from ...errors import KDGuardError, check_range
from ...losses.logit import kd_loss
from ...models.stages import stage_paths
from .detox import FeatureDetox

METHODS = ("ofd", "kd")
MARGINS = ("auto", "bn", "none")


def salt_and_pepper(x: torch.Tensor, density: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Salt-and-pepper noise: each pixel, with probability ``density``, becomes black or white.

    Args:
        x: float images ``N×C×H×W`` in [0, 1] (any device).
        density: fraction of pixels replaced, in [0, 1] (RobustKD reference default 0.1).
        generator: optional generator on ``x``'s device (default: the global RNG).

    Returns:
        A new tensor like ``x``: a hit pixel gets 0 or 1 (equal odds) in **all** channels, as an
        impulse-noise pixel in an image would; other pixels are unchanged.

    Raises:
        KDGuardError: ``x`` is not a float 4-D tensor, or ``density`` is outside [0, 1].
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise KDGuardError("salt-and-pepper noise needs float images N×C×H×W in [0, 1]",
                           "convert uint8 images with kdguard.data.to_float first")
    check_range("salt-and-pepper density", float(density), 0.0, 1.0)
    if density == 0:
        return x.clone()
    n, _, h, w = x.shape
    u = torch.rand((n, 1, h, w), device=x.device, generator=generator)
    salt = torch.rand((n, 1, h, w), device=x.device, generator=generator) < 0.5
    hit = u < density
    return torch.where(hit, salt.to(x.dtype).expand_as(x), x)


def _preset(model: nn.Module, kind: str, role: str) -> list[str]:
    try:
        return list(stage_paths(model, kind))
    except KDGuardError as e:
        raise KDGuardError(f"no default {kind} feature paths for the {role}: {e.problem}",
                           f"give {role}_paths (distill.{role}_paths=[...] in a robustkd job): module paths "
                           "from model.named_modules()") from None


def align_stages(s_paths: Sequence[str], s_shapes: Sequence[Sequence[int]], t_paths: Sequence[str],
                 t_shapes: Sequence[Sequence[int]]) -> list[tuple[str, str]]:
    """Pair student and teacher stages: one to one if the counts match, else by resolution.

    With different stage counts (e.g. WRN-28-4 with 3 stages → ResNet-18 with 4), each teacher
    stage takes the deepest student stage of the same spatial size ``H×W``.

    Returns:
        ``[(student_path, teacher_path), ...]`` in teacher order.

    Raises:
        KDGuardError: a teacher stage has no student stage of its resolution.
    """
    if len(s_paths) == len(t_paths):
        return list(zip(s_paths, t_paths))
    pairs = []
    for tp, ts in zip(t_paths, t_shapes):
        same = [sp for sp, ss in zip(s_paths, s_shapes) if tuple(ss[1:]) == tuple(ts[1:])]
        if not same:
            raise KDGuardError(f"no student stage has the resolution {tuple(ts[1:])} of teacher stage {tp!r}",
                               "give student_paths and teacher_paths, the same number, aligned (distill.student_paths "
                               "and distill.teacher_paths in a robustkd job)")
        pairs.append((same[-1], tp))
    return pairs


class RobustKDDistiller(Distiller):
    """Student + frozen, detoxified teacher; OFD (or KD) + CE, with optional input noise.

    Args:
        student, teacher: models taking ``N×C×H×W`` floats in [0, 1] and returning ``N×K``.
        detox: the teacher's :class:`~.detox.FeatureDetox` (frozen here, kept as a submodule so
            it moves with the distiller), or ``None`` for plain OFD/KD (the no-detox baseline).
        input_shape: per-sample image shape ``(C, H, W)`` for the dry run that sizes connectors.
        method: ``"ofd"`` (RobustKD) or ``"kd"`` (Hinton KD from the same teacher).
        student_paths, teacher_paths: pre-ReLU feature paths for OFD (default: each model's
            ``pre_relu`` stage preset, aligned by :func:`align_stages`).
        ce_weight: weight of CE on the (noisy) student input (1, reference).
        ofd_weight: weight of the OFD term (1; the ``1/(1000·B)`` is inside ``normalization``).
        kd_weight, temperature: weight and τ of the KD term (``method="kd"``).
        margin: ``"bn"`` (teacher BN margins; error without BN), ``"none"`` (no clipping), or
            ``"auto"`` (BN margins where the teacher has the BN layers, else none; default).
        margin_paths: explicit BN paths for the margins.
        normalization, stage_weights: OFD options (see :class:`~kdguard.distill.terms.OFDTerm`).
        noise: salt-and-pepper density for the student input in [0, 1] (0 = off; the
            reference's helper defaults to 0.1).

    Forward (training): ``(student_logits N×K, {"ce": ..., "ofd" | "kd": ...})`` (weighted).
    Eval: student logits.

    Raises:
        KDGuardError: bad options, paths that do not exist or pair up, BN margins requested from
            a teacher without BN layers.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, detox: FeatureDetox | None, *,
                 input_shape: Sequence[int], method: str = "ofd",
                 student_paths: Sequence[str] | None = None, teacher_paths: Sequence[str] | None = None,
                 ce_weight: float = 1.0, ofd_weight: float = 1.0, kd_weight: float = 0.9,
                 temperature: float = 4.0, margin: str = "auto", margin_paths: Sequence[str] | None = None,
                 normalization: str = "reference", stage_weights: str = "reference",
                 noise: float = 0.0) -> None:
        super().__init__(student, teacher)
        if method not in METHODS:
            raise KDGuardError(f"unknown RobustKD distillation method {method!r}", "use 'ofd' or 'kd'")
        if margin not in MARGINS:
            raise KDGuardError(f"unknown OFD margin {margin!r}", f"use one of: {', '.join(MARGINS)}")
        for name, w in (("ce_weight", ce_weight), ("ofd_weight", ofd_weight), ("kd_weight", kd_weight)):
            check_range(name, float(w), 0.0, 1e9)
        if temperature <= 0:
            raise KDGuardError(f"temperature {temperature!r} must be > 0", "use e.g. 4.0")
        check_range("salt-and-pepper density", float(noise), 0.0, 1.0)
        self.method, self.noise = method, float(noise)
        self.ce_weight, self.ofd_weight, self.kd_weight = float(ce_weight), float(ofd_weight), float(kd_weight)
        self.temperature = float(temperature)
        self.detox = detox.freeze() if detox is not None else None
        self._detox_hooks = self.detox.attach(teacher) if self.detox is not None else None
        self.pairs: list[tuple[str, str]] = []
        self.margin_used = "none"
        self.ofd: OFDTerm | None = None
        self._s_taps = self._t_taps = None
        if method == "ofd":
            self._build_ofd(input_shape, student_paths, teacher_paths, margin, margin_paths,
                            normalization, stage_weights)

    def _build_ofd(self, input_shape, student_paths, teacher_paths, margin, margin_paths,
                   normalization, stage_weights) -> None:
        t_paths = list(teacher_paths) if teacher_paths is not None else _preset(self.teacher, "pre_relu", "teacher")
        s_paths = list(student_paths) if student_paths is not None else _preset(self.student, "pre_relu", "student")
        t_shapes = feature_shapes(self.teacher, t_paths, input_shape)
        s_shapes = feature_shapes(self.student, s_paths, input_shape)
        if student_paths is not None and teacher_paths is not None and len(s_paths) != len(t_paths):
            raise KDGuardError(f"{len(s_paths)} student paths and {len(t_paths)} teacher paths were given",
                               "give one student path per teacher path")
        self.pairs = align_stages(s_paths, s_shapes, t_paths, t_shapes)
        s_of, t_of = dict(zip(s_paths, s_shapes)), dict(zip(t_paths, t_shapes))
        margins = None
        if margin != "none":
            if margin_paths is None and teacher_paths is None:
                try:
                    margin_paths = _preset(self.teacher, "pre_relu_bn", "teacher")
                except KDGuardError:
                    margin_paths = None
            try:
                margins = teacher_margins(self.teacher, t_paths, [t_of[p][0] for p in t_paths],
                                          margin_paths=margin_paths)
                self.margin_used = "bn"
            except KDGuardError:
                if margin == "bn":
                    raise
                margins = None  # "auto": a teacher without BN (e.g. LeNet-5) gets plain partial L2
        self.ofd = OFDTerm([s_of[s] for s, _ in self.pairs], [t_of[t] for _, t in self.pairs],
                           margins=margins, normalization=normalization, stage_weights=stage_weights)
        self._s_taps = GuardedTaps(self.student, list(dict.fromkeys(s for s, _ in self.pairs)))
        # registered after the detox hooks, which are prepended anyway: taps see edited features
        self._t_taps = GuardedTaps(self.teacher, list(dict.fromkeys(t for _, t in self.pairs)), detach=True)

    # -- forward ------------------------------------------------------------------------------
    def forward_train(self, x: torch.Tensor, y: torch.Tensor | None):
        try:
            with torch.no_grad():
                if self._t_taps is not None:
                    t_logits, t_feats = self._t_taps(x)
                elif self.method == "kd" and self.kd_weight == 0:  # CE-only baseline: no teacher pass
                    t_logits, t_feats = None, {}
                else:
                    t_logits, t_feats = self.teacher(x), {}
            xs = salt_and_pepper(x, self.noise) if self.noise > 0 else x
            if self._s_taps is not None:
                s_logits, s_feats = self._s_taps(xs)
            else:
                s_logits, s_feats = self.student(xs), {}
            losses: dict[str, torch.Tensor] = {}
            if self.ce_weight > 0 and y is not None:
                losses["ce"] = self.ce_weight * F.cross_entropy(s_logits.float(), y)
            if self.method == "ofd":
                value = self.ofd([s_feats[s] for s, _ in self.pairs], [t_feats[t] for _, t in self.pairs],
                                 s_logits=s_logits, t_logits=t_logits.detach(), y=y)
                losses["ofd"] = self.ofd_weight * value
            elif self.kd_weight > 0:
                losses["kd"] = self.kd_weight * kd_loss(s_logits, t_logits.detach(), temperature=self.temperature)
        finally:
            for taps in (self._s_taps, self._t_taps):
                if taps is not None:
                    taps.clear()
        if not losses:
            raise KDGuardError("the RobustKD distiller produced no loss (CE skipped without labels, "
                               "KD weight 0)", "pass labels or give kd_weight > 0")
        return s_logits, losses

    def close(self) -> None:
        """Remove every hook this distiller put on the student and the teacher."""
        for taps in (self._s_taps, self._t_taps):
            if taps is not None:
                taps.remove()
        self._s_taps = self._t_taps = None
        if self._detox_hooks is not None:
            self._detox_hooks.remove()
            self._detox_hooks = None

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, pairs={self.pairs}, margin={self.margin_used!r}, "
                f"ce_weight={self.ce_weight}, ofd_weight={self.ofd_weight}, noise={self.noise}")
