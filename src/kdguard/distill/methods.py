"""Registry of KD methods and :func:`build_distiller`, which turns a method spec into a distiller.

A method spec is a registered name (``"at"``), a ``+``-combination (``"at+kd"``) or a dict of
weights (``{"at": 1000, "kd": 1.0}``). Every method is one :class:`~kdguard.distill.terms.DistillTerm`
inside a :class:`~kdguard.distill.FeatureDistiller`, so each term is logged under its method
name, next to ``"ce"``.

Default weights (used for names and ``+``-combinations; a dict gives its own):

============  ========  =====================================================================
method        weight    source of the default
============  ========  =====================================================================
kd            1 (0.9)   τ = 4. Alone: KD 0.9 + CE 0.1, i.e. Hinton's α = 0.9 as in
                        ``LogitKD``, mdistiller ``KD`` and RepDistiller ``-r 0.1 -a 0.9``.
                        In a combination: 1 (RepDistiller ``-a 1``), CE 1.
dkd           1         α = 1, β = 8, τ = 4, CE 1, linear warm-up over 20 epochs (mdistiller
                        CIFAR-100 ``DKD`` config; ``warmup_epochs=0`` is the paper's Eq. 8).
fitnet        100       mdistiller ``FITNET.LOSS.FEAT_WEIGHT`` / RepDistiller ``-b 100``; the
                        middle stage (their ``hint_layer = 2`` on 3-stage CIFAR nets).
at            1000      Zagoruyko & Komodakis' README (β = 10³), mdistiller, RepDistiller; per
                        stage, summed over all stages.
sp            3000      Tung & Mori 2019 (γ = 3000), mdistiller, RepDistiller; last stage.
rkd           1         with λ_D = 25, λ_A = 50 inside (Park et al. 2019 §4.1, RepDistiller);
                        penultimate embedding.
pkt           30000     RepDistiller ``-b 30000``, mdistiller; penultimate embedding.
cc            100       γ = 0.4, P = 2 (Knowledge-Distillation-Zoo's CC example, the paper's
                        kernel form); penultimate embedding.
correlation   0.02      RepDistiller ``-b 0.02`` for its simplified "Correlation" (see
                        :mod:`kdguard.losses.cc`); 128-d learned embeddings.
nst           50        RepDistiller ``-b 50``, mdistiller; all stages.
afd           1000      paper 1's code (``--distill_way AFD``: 1000 per stage, ``att_f`` = 2);
                        all stages. KD-Zoo's example uses 500 with ``att_f`` = 1.
ofd           1         with the reference normalisation ÷(1000·batch) and stage weights
                        1/2^(n−1−i) inside (clovaai/overhaul-distillation; mdistiller's 0.001 ×
                        per-batch sum is the same); pre-ReLU features of all stages.
crd           0.8       RepDistiller CIFAR-100 (KD-Zoo: 0.2 on CIFAR-10); K = 16384, τ = 0.07,
                        momentum 0.5, 128-d; penultimate embedding; needs dataset indices.
============  ========  =====================================================================

The CE weight is 1 unless the method is ``"kd"`` alone (0.1); ``ce_weight=`` overrides it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import KDGuardError
from ..registry import Registry
from .feature import FeatureDistiller
from .probe import check_input_shape, probe
from .terms import (AFDTerm, ATTerm, CCTerm, CorrelationTerm, CRDTerm, DistillTerm, DKDTerm,
                    FitNetTerm, KDTerm, NSTTerm, OFDTerm, PKTTerm, RKDTerm, SPTerm, teacher_margins)

#: feature kinds a method reads; the non-None ones are ``kdguard.models.stages.stage_paths`` kinds
FEATURE_KINDS = (None, "stages", "pre_relu", "penultimate")
#: which of the default paths a method uses
STAGE_SELECTIONS = ("all", "middle", "last")


@dataclass(frozen=True)
class BuildContext:
    """Everything a method builder may need. Shapes are per sample (no batch dimension)."""

    student: nn.Module
    teacher: nn.Module
    student_paths: list[str]
    teacher_paths: list[str]
    s_shapes: list[tuple[int, ...]]
    t_shapes: list[tuple[int, ...]]
    input_shape: tuple[int, int, int]
    num_classes: int | None
    dataset_size: int | None


Builder = Callable[..., DistillTerm]

KD_METHODS: Registry[Builder] = Registry("KD method")


def _method(name: str, *, description: str, source: str, needs: tuple[str, ...], features: str | None,
            stages: str | None, weight: float, solo_weight: float | None = None,
            solo_ce_weight: float = 1.0, aliases: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    if features not in FEATURE_KINDS or (features is not None and stages not in STAGE_SELECTIONS):
        raise ValueError(f"bad registration of KD method {name!r}: features={features!r}, stages={stages!r}")
    return KD_METHODS.register(
        name, aliases=aliases, description=description, source=source, needs=needs, features=features,
        stages=stages, default_weight=weight,
        solo_weight=weight if solo_weight is None else solo_weight, solo_ce_weight=solo_ce_weight)


# -- the methods ---------------------------------------------------------------------------------

@_method("kd", description="Hinton logit KD: τ²·KL(teacher ‖ student) on softened logits",
         source="Hinton et al. 2015 (arXiv:1503.02531)", needs=("logits",), features=None, stages=None,
         weight=1.0, solo_weight=0.9, solo_ce_weight=0.1, aliases=("logit", "hinton"))
def _kd(ctx: BuildContext, *, temperature: float = 4.0, reduction: str = "batchmean") -> DistillTerm:
    return KDTerm(temperature=temperature, reduction=reduction)


@_method("dkd", description="decoupled KD: τ²(α·TCKD + β·NCKD)",
         source="Zhao et al., CVPR 2022; mdistiller CIFAR-100 config", needs=("logits", "labels"),
         features=None, stages=None, weight=1.0)
def _dkd(ctx: BuildContext, *, alpha: float = 1.0, beta: float = 8.0,
         temperature: float = 4.0, warmup_epochs: float = 20.0) -> DistillTerm:
    return DKDTerm(alpha=alpha, beta=beta, temperature=temperature, warmup_epochs=warmup_epochs)


@_method("fitnet", description="FitNets hint: MSE between a connected student stage and the teacher's",
         source="Romero et al., ICLR 2015; mdistiller/RepDistiller", needs=("features",),
         features="stages", stages="middle", weight=100.0, aliases=("hint",))
def _fitnet(ctx: BuildContext, *, connector: str = "auto", reduction: str = "mean") -> DistillTerm:
    return FitNetTerm(ctx.s_shapes, ctx.t_shapes, connector=connector, reduction=reduction)


@_method("at", description="attention transfer on spatial attention maps of every stage",
         source="Zagoruyko & Komodakis, ICLR 2017", needs=("features",), features="stages",
         stages="all", weight=1000.0, aliases=("attention",))
def _at(ctx: BuildContext, *, variant: str = "zagoruyko", p: float = 2.0) -> DistillTerm:
    # checked here, not at the first batch: the losses only see p when training has started
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not p > 0:
        raise KDGuardError(f"AT exponent p {p!r} must be a number > 0", "use kd.options.p=2 as in the paper")
    from ..losses.attention import AT_VARIANTS
    if variant in AT_VARIANTS and not AT_VARIANTS[variant].absolute and float(p) != int(p):
        raise KDGuardError(f"AT variant {variant!r} raises signed features to p={p!r}, which needs an integer p",
                           "use an integer kd.options.p, or kd.options.variant=nad (absolute values)")
    return ATTerm(variant=variant, p=p)


@_method("sp", description="similarity preserving: batch similarity matrices of the last stage",
         source="Tung & Mori, ICCV 2019", needs=("features",), features="stages", stages="last",
         weight=3000.0)
def _sp(ctx: BuildContext) -> DistillTerm:
    return SPTerm()


@_method("rkd", description="relational KD: distance- and angle-wise relations of embeddings",
         source="Park et al., CVPR 2019", needs=("penultimate",), features="penultimate",
         stages="last", weight=1.0)
def _rkd(ctx: BuildContext, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
         reduction: str = "mean") -> DistillTerm:
    return RKDTerm(distance_weight=distance_weight, angle_weight=angle_weight, reduction=reduction)


@_method("pkt", description="probabilistic KT: KL between cosine-kernel conditionals of embeddings",
         source="Passalis & Tefas, ECCV 2018; RepDistiller", needs=("penultimate",),
         features="penultimate", stages="last", weight=30000.0)
def _pkt(ctx: BuildContext, *, reduction: str = "mean") -> DistillTerm:
    return PKTTerm(reduction=reduction)


@_method("cc", description="correlation congruence: Taylor-expanded RBF correlation matrices",
         source="Peng et al., ICCV 2019; Knowledge-Distillation-Zoo settings", needs=("penultimate",),
         features="penultimate", stages="last", weight=100.0)
def _cc(ctx: BuildContext, *, gamma: float = 0.4, order: int = 2, kernel: str = "taylor") -> DistillTerm:
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma > 0:
        raise KDGuardError(f"CC kernel width gamma {gamma!r} must be a number > 0", "use kd.options.gamma=0.4")
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise KDGuardError(f"CC Taylor order {order!r} must be an integer >= 0", "use kd.options.order=2")
    return CCTerm(gamma=gamma, order=order, kernel=kernel)


@_method("correlation", description="RepDistiller's simplified 'Correlation' (not the CC paper)",
         source="HobbitLong/RepDistiller Correlation; paper 1's --distill_way CC",
         needs=("penultimate",), features="penultimate", stages="last", weight=0.02,
         aliases=("cc_simple",))
def _correlation(ctx: BuildContext, *, embed_dim: int = 128, train_teacher_embed: bool = True) -> DistillTerm:
    return CorrelationTerm(ctx.s_shapes, ctx.t_shapes, embed_dim=embed_dim,
                           train_teacher_embed=train_teacher_embed)


@_method("nst", description="neuron selectivity transfer: polynomial-kernel MMD of channel maps",
         source="Huang & Wang 2017 (arXiv:1707.01219); RepDistiller", needs=("features",),
         features="stages", stages="all", weight=50.0)
def _nst(ctx: BuildContext, *, degree: int = 2, c: float = 0.0, full: bool = True) -> DistillTerm:
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise KDGuardError(f"NST polynomial degree {degree!r} must be an integer >= 1", "use kd.options.degree=2")
    return NSTTerm(degree=degree, c=c, full=full)


@_method("afd", description="attention-based feature distillation (channel-attention-weighted MSE)",
         source="Wang et al., ICLR 2020 via KD-Zoo; paper 1's code (Han et al. 2024)",
         needs=("features",), features="stages", stages="all", weight=1000.0)
def _afd(ctx: BuildContext, *, att_f: float = 2.0, train_attention: bool = True) -> DistillTerm:
    return AFDTerm(ctx.s_shapes, ctx.t_shapes, att_f=att_f, train_attention=train_attention)


@_method("ofd", description="overhaul of feature distillation: margin ReLU + partial L2 on pre-ReLU features",
         source="Heo et al., ICCV 2019; clovaai/overhaul-distillation", needs=("pre_relu",),
         features="pre_relu", stages="all", weight=1.0, aliases=("overhaul",))
def _ofd(ctx: BuildContext, *, margin: str = "auto", margin_paths: Sequence[str] | None = None,
         normalization: str = "reference", stage_weights: str = "reference") -> DistillTerm:
    # margin: "bn" (paper/code: from the teacher's BatchNorm, an error if there is none),
    # "auto" ("bn" where the teacher has BatchNorm, else no clipping, with a warning: BN-free
    # teachers such as LeNet-5 still distil) or "none". BN layers named by the user in
    # margin_paths are always strict: a wrong name is an error, not a silent fallback.
    if margin not in ("auto", "bn", "none"):
        raise KDGuardError(f"unknown OFD margin {margin!r}",
                           "use 'auto' (default), 'bn' (from the teacher's BatchNorm) or 'none'")
    margins = None
    if margin in ("auto", "bn"):
        strict = margin == "bn" or margin_paths is not None
        channels = [s[0] for s in ctx.t_shapes]
        if margin_paths is None:
            margin_paths = _preset_margin_paths(ctx.teacher, ctx.teacher_paths)
        try:
            margins = teacher_margins(ctx.teacher, ctx.teacher_paths, channels, margin_paths=margin_paths)
        except KDGuardError as e:
            if strict:
                raise
            warnings.warn(f"{e.problem}; OFD distils without the margin (plain partial L2). "
                          "Set margin='bn' to make this an error, or margin='none' to silence it",
                          stacklevel=2)
    return OFDTerm(ctx.s_shapes, ctx.t_shapes, margins=margins, normalization=normalization,
                   stage_weights=stage_weights)


def _preset_margin_paths(teacher: nn.Module, teacher_paths: list[str]) -> list[str] | None:
    """The model's ``pre_relu_bn`` preset when the teacher paths are its ``pre_relu`` preset.

    Otherwise ``None``: :func:`~kdguard.distill.terms.teacher_margins` then searches for the BN.
    """
    try:
        from ..models.stages import stage_paths

        if list(stage_paths(teacher, "pre_relu")) == list(teacher_paths):
            return list(stage_paths(teacher, "pre_relu_bn"))
    except (ImportError, KDGuardError):
        pass
    return None


@_method("crd", description="contrastive representation distillation with a dataset memory bank",
         source="Tian et al., ICLR 2020; RepDistiller", needs=("penultimate", "index"),
         features="penultimate", stages="last", weight=0.8)
def _crd(ctx: BuildContext, *, embed_dim: int = 128, nce_k: int = 16384, temperature: float = 0.07,
         momentum: float = 0.5, dataset_labels: torch.Tensor | None = None) -> DistillTerm:
    if ctx.dataset_size is None:
        raise KDGuardError("CRD needs the training-set size for its memory bank",
                           "call build_distiller(..., dataset_size=len(train_set))")
    return CRDTerm(ctx.s_shapes, ctx.t_shapes, dataset_size=ctx.dataset_size, embed_dim=embed_dim,
                   nce_k=nce_k, temperature=temperature, momentum=momentum, dataset_labels=dataset_labels)


# -- building ------------------------------------------------------------------------------------

MethodSpec = str | Mapping[str, float]
PathSpec = Sequence[str] | Mapping[str, Sequence[str]] | None


def parse_method(method: MethodSpec) -> tuple[dict[str, float | None], bool]:
    """Normalise a method spec to ``({canonical name: weight or None}, weights_given)``.

    Raises:
        KDGuardError: empty spec, unknown or repeated name, or a bad weight.
    """
    if isinstance(method, str):
        names = [part.strip() for part in method.split("+")]
        if not all(names):
            raise KDGuardError(f"KD method {method!r} has an empty part", "write e.g. 'at+kd'")
        weights: dict[str, float | None] = {}
        for n in names:
            key = KD_METHODS.resolve(n)
            if key in weights:
                raise KDGuardError(f"KD method {key!r} appears twice in {method!r}", "list each method once")
            weights[key] = None
        return weights, False
    if isinstance(method, Mapping) and method:
        weights = {}
        for n, w in method.items():
            key = KD_METHODS.resolve(str(n))
            if key in weights:
                raise KDGuardError(f"KD method {key!r} appears twice in {dict(method)!r}",
                                   "list each method once")
            try:
                w = float(w)
            except (TypeError, ValueError):
                w = math.nan
            if not math.isfinite(w) or w < 0:
                raise KDGuardError(f"weight {method[n]!r} of KD method {key!r} is not a finite number >= 0",
                                   "give non-negative weights, e.g. {'at': 1000, 'kd': 1.0}")
            weights[key] = w
        return weights, True
    raise KDGuardError(f"KD method {method!r} is neither a name nor a non-empty dict of weights",
                       "pass e.g. 'at', 'at+kd' or {'at': 1000, 'kd': 1.0}")


def _option_names(builder: Builder) -> list[str]:
    params = list(inspect.signature(builder).parameters.values())[1:]  # drop ctx
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _route_options(names: list[str], options: dict) -> dict[str, dict]:
    """Split ``options`` into per-method keyword dicts (see :func:`build_distiller`)."""
    accepted = {n: _option_names(KD_METHODS.get(n)) for n in names}
    routed: dict[str, dict] = {n: {} for n in names}
    for key, value in options.items():
        target = KD_METHODS.resolve(key) if key in KD_METHODS else None
        if target is not None and isinstance(value, Mapping):
            if target not in routed:
                raise KDGuardError(f"options given for KD method {key!r}, which is not part of "
                                   f"{'+'.join(names)!r}", "remove them or add the method")
            for k, v in value.items():
                if k not in accepted[target]:
                    raise KDGuardError(f"KD method {target!r} has no option {k!r}",
                                       f"its options are: {', '.join(accepted[target]) or 'none'}")
                routed[target][k] = v
            continue
        takers = [n for n in names if key in accepted[n]]
        if not takers:
            valid = sorted({o for n in names for o in accepted[n]})
            raise KDGuardError(f"option {key!r} is not accepted by KD method {'+'.join(names)!r}",
                               f"valid options: {', '.join(valid) or 'none'}")
        for n in takers:
            routed[n].setdefault(key, value)
    return routed


def _default_paths(model: nn.Module, kind: str, role: str) -> list[str]:
    try:
        from ..models.stages import stage_paths
    except ImportError:
        raise KDGuardError(f"no default {kind} feature paths for the {role} ({type(model).__name__}): "
                           "kdguard.models.stages is unavailable",
                           f"give {role}_paths (kd.options.{role}_paths=[...] in a distill job): module paths "
                           "from model.named_modules()") from None
    try:
        paths = list(stage_paths(model, kind))
    except KDGuardError as e:
        raise KDGuardError(f"no default {kind} feature paths for the {role} ({type(model).__name__}): "
                           f"{e.problem}",
                           f"give {role}_paths (kd.options.{role}_paths=[...] in a distill job): module paths "
                           "from model.named_modules()") from None
    if not paths:
        raise KDGuardError(f"the {role} ({type(model).__name__}) has no {kind} feature paths",
                           f"give {role}_paths (kd.options.{role}_paths=[...] in a distill job)")
    return paths


def _select(paths: list[str], how: str) -> list[str]:
    if how == "middle":
        return [paths[(len(paths) - 1) // 2]]
    if how == "last":
        return [paths[-1]]
    return paths


def _paths_for(name: str, meta: dict, model: nn.Module, given: PathSpec, role: str) -> list[str]:
    if meta["features"] is None:
        return []
    if isinstance(given, Mapping):
        given = given.get(name)
    if given is None:
        return _select(_default_paths(model, meta["features"], role), meta["stages"])
    if isinstance(given, str):
        raise KDGuardError(f"{role}_paths {given!r} is a string, not a list of module paths",
                           f"write it as a list: kd.options.{role}_paths=[{given!r}] in a distill job")
    return list(given)


def build_distiller(method: MethodSpec, student: nn.Module, teacher: nn.Module, *,
                    input_shape: Sequence[int], student_paths: PathSpec = None,
                    teacher_paths: PathSpec = None, num_classes: int | None = None,
                    dataset_size: int | None = None, ce_weight: float | None = None,
                    **options) -> FeatureDistiller:
    """Build a :class:`FeatureDistiller` for a KD method spec.

    Args:
        method: a registered name (see ``KD_METHODS.names()``), a ``+``-combination such as
            ``"at+kd"`` (default weights), or a dict of weights ``{"at": 1000, "kd": 1.0}``.
        student, teacher: the models (``N×C×H×W`` float images in [0, 1] → logits).
        input_shape: per-sample image shape ``(C, H, W)``, used for one dry run per model that
            finds the feature shapes (connectors, embeddings are sized from them).
        student_paths, teacher_paths: module paths of the features, aligned pairwise. ``None``
            (default) takes each method's default from ``kdguard.models.stages.stage_paths``
            (kind ``stages``, ``pre_relu`` or ``penultimate``; then all / the middle / the last
            stage as the method's metadata says). A list applies to every feature method (as
            given, no stage selection); a dict ``{method: [paths]}`` sets them per method.
        num_classes: if given, both models' outputs are checked to have this many logits.
        dataset_size: training-set size; required by ``crd``.
        ce_weight: weight of the cross-entropy term (default 1; 0.1 for ``"kd"`` alone).
        **options: method options. ``at={"variant": "paper"}`` targets one method; a plain
            keyword (``variant="paper"``, ``temperature=2``) goes to every chosen method that
            accepts it.

    Returns:
        A :class:`FeatureDistiller` with one term per method, named by its canonical name.

    Raises:
        KDGuardError: unknown method or option, bad weights, missing default paths, paths that
            do not exist or do not pair up, mismatched logits, or a method-specific problem
            (e.g. CRD without ``dataset_size``, OFD without a BatchNorm for the margin).
    """
    weights, given = parse_method(method)
    names = list(weights)
    shape = check_input_shape(input_shape)
    routed = _route_options(names, options)
    metas = {n: KD_METHODS.meta(n) for n in names}

    s_paths = {n: _paths_for(n, metas[n], student, student_paths, "student") for n in names}
    t_paths = {n: _paths_for(n, metas[n], teacher, teacher_paths, "teacher") for n in names}
    for n in names:
        if metas[n]["features"] is not None and (not s_paths[n] or len(s_paths[n]) != len(t_paths[n])):
            raise KDGuardError(f"KD method {n!r} got {len(s_paths[n])} student and {len(t_paths[n])} "
                               "teacher feature paths",
                               "give the same, non-zero number of each, aligned pairwise")

    s_union = list(dict.fromkeys(p for n in names for p in s_paths[n]))
    t_union = list(dict.fromkeys(p for n in names for p in t_paths[n]))
    s_probe, t_probe = probe(student, s_union, shape), probe(teacher, t_union, shape)
    _check_logits(s_probe.output_shape, t_probe.output_shape, num_classes,
                  any(metas[n]["features"] is None for n in names))
    s_shape_of = dict(zip(s_union, s_probe.feature_shapes))
    t_shape_of = dict(zip(t_union, t_probe.feature_shapes))

    terms: dict[str, tuple[float, DistillTerm]] = {}
    for n in names:
        ctx = BuildContext(student, teacher, s_paths[n], t_paths[n], [s_shape_of[p] for p in s_paths[n]],
                           [t_shape_of[p] for p in t_paths[n]], shape, num_classes, dataset_size)
        term = KD_METHODS.get(n)(ctx, **routed[n])
        if term.uses_features:
            term.student_paths, term.teacher_paths = list(s_paths[n]), list(t_paths[n])
        solo = len(names) == 1 and not given
        weight = weights[n] if given else metas[n]["solo_weight" if solo else "default_weight"]
        terms[n] = (weight, term)

    if ce_weight is None:
        ce_weight = metas[names[0]]["solo_ce_weight"] if len(names) == 1 and not given else 1.0
    return FeatureDistiller(student, teacher, terms=terms, ce_weight=ce_weight)


def _check_logits(s_out: tuple[int, ...], t_out: tuple[int, ...], num_classes: int | None,
                  logit_terms: bool) -> None:
    if num_classes is not None:
        for role, out in (("student", s_out), ("teacher", t_out)):
            if out != (num_classes,):
                raise KDGuardError(f"the {role} outputs shape {out} per sample, expected "
                                   f"({num_classes},) logits",
                                   f"build the {role} with build_model(..., num_classes={num_classes})")
    if logit_terms and s_out != t_out:
        raise KDGuardError(f"student and teacher logits differ in shape: {s_out} vs {t_out}",
                           "logit distillation needs both models to predict the same classes")
