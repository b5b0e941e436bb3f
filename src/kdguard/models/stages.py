"""Named feature tap points ("stage presets") for the built-in architectures.

:func:`stage_paths` turns a model (or a model name) and a preset kind into module paths for
:class:`kdguard.taps.FeatureTaps`. Preset kinds (:data:`PRESET_KINDS`):

``stages``
    The outputs of the residual groups / conv stages, 4-D, shallow to deep, each at a lower
    resolution than the one before. CIFAR ResNets ``layer1..3``; ResNet-18 ``layer1..4``; WRN
    ``block1..3`` (raw pre-activation sums, the features ZSKT's attention term, NAD and RobustKD
    use); MobileNetV2 its four resolution stages ``layer1..4``; VGG the five conv blocks
    *before* their max-pool ``block1..5`` (post-ReLU); LeNet-5 its two conv blocks (after the pool).
``pre_relu``
    The pre-ReLU stage features OFD distils (Heo et al., "A Comprehensive Overhaul of Feature
    Distillation", ICCV 2019, §3.1–3.2). WRN: the BN outputs that start ``block2`` and ``block3``
    plus ``bn_final`` (the reference code's ``get_bn_before_relu``). Post-activation ResNets:
    each stage's last residual sum before its ReLU, tapped at the block's ``preact`` identity
    (OFD's ImageNet ResNet code also takes the sum before the last ReLU). VGG: the last BN of each
    block. MobileNetV2: the stage outputs themselves, which are linear bottlenecks with no ReLU.
    LeNet-5: the conv outputs (it has no BN).
``pre_relu_bn``
    For each ``pre_relu`` tap, the BatchNorm whose statistics (``weight``/``bias`` = σ/μ of the
    pre-ReLU response) OFD uses for its margin (Eq. 5). For post-activation ResNets this is the
    stage's last ``bn2`` (OFD's reference choice, which ignores the shortcut's contribution);
    for MobileNetV2 the last block's ``bn3``. Not defined for LeNet-5.
``penultimate``
    The pooled feature vector fed to the classifier (``N×D``, D = ``model.feature_dim``).
``classifier``
    The final linear layer (``fc``).

:data:`STAGE_PRESETS` maps an architecture family (the class attribute ``family`` of each
built-in model) to ``{kind: function(model) -> paths}``; paths are derived from the instance, so
depth and width variants need no tables. A user model can define its own presets as an attribute
``stage_presets = {"stages": [...], ...}``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import KDGuardError
from ..taps import resolve_module

PresetFn = Callable[[nn.Module], list[str]]

#: Preset kinds and what they select.
PRESET_KINDS: dict[str, str] = {
    "stages": "outputs of the residual groups / conv stages (4-D, decreasing resolution)",
    "pre_relu": "pre-ReLU stage features distilled by OFD (Heo et al. 2019)",
    "pre_relu_bn": "the BatchNorm behind each pre_relu tap, for OFD's margin",
    "penultimate": "the pooled feature vector before the classifier (N×D)",
    "classifier": "the final linear layer",
}


def _numbered(model: nn.Module, prefix: str) -> list[str]:
    """``[prefix1, prefix2, ...]`` for the consecutive children that exist."""
    names, i = [], 1
    while isinstance(getattr(model, f"{prefix}{i}", None), nn.Module):
        names.append(f"{prefix}{i}")
        i += 1
    return names


def _last_unit(model: nn.Module, stage: str, leaf: str) -> str:
    return f"{stage}.{len(model.get_submodule(stage)) - 1}.{leaf}"


def _common(stages: PresetFn, pre_relu: PresetFn, pre_relu_bn: PresetFn | None) -> dict[str, PresetFn]:
    presets = {"stages": stages, "pre_relu": pre_relu,
               "penultimate": lambda m: ["penultimate"], "classifier": lambda m: ["fc"]}
    if pre_relu_bn is not None:
        presets["pre_relu_bn"] = pre_relu_bn
    return presets


_resnet = _common(
    stages=lambda m: _numbered(m, "layer"),
    pre_relu=lambda m: [_last_unit(m, s, "preact") for s in _numbered(m, "layer")],
    pre_relu_bn=lambda m: [_last_unit(m, s, "bn2") for s in _numbered(m, "layer")],
)


def _wrn_pre_relu(model: nn.Module) -> list[str]:
    groups = _numbered(model, "block")
    return [f"{g}.0.bn1" for g in groups[1:]] + ["bn_final"]


def _vgg_last_bn(model: nn.Module) -> list[str]:
    return [_last_unit(model, b, "bn") for b in _numbered(model, "block")]


#: family → preset kind → function(model) → module paths.
STAGE_PRESETS: dict[str, dict[str, PresetFn]] = {
    "resnet_cifar": _resnet,
    "resnet": _resnet,
    "wrn": _common(stages=lambda m: _numbered(m, "block"), pre_relu=_wrn_pre_relu,
                   pre_relu_bn=_wrn_pre_relu),
    "mobilenetv2": _common(
        stages=lambda m: _numbered(m, "layer"),
        pre_relu=lambda m: _numbered(m, "layer"),
        pre_relu_bn=lambda m: [_last_unit(m, s, "bn3") for s in _numbered(m, "layer")]),
    "vgg": _common(stages=lambda m: _numbered(m, "block"), pre_relu=_vgg_last_bn,
                   pre_relu_bn=_vgg_last_bn),
    "lenet": _common(stages=lambda m: _numbered(m, "block"),
                     pre_relu=lambda m: [f"{b}.conv" for b in _numbered(m, "block")],
                     pre_relu_bn=None),
}


def _model_from_name(name: str) -> nn.Module:
    from .registry import build_model  # registry imports the architectures; keep this module light

    with torch.device("meta"):  # structure only: no memory, no init cost
        return build_model(name, num_classes=10, in_channels=3)


def stage_paths(model_or_name: nn.Module | str, kind: str = "stages") -> list[str]:
    """Module paths of preset ``kind`` for a model instance or a model name.

    Args:
        model_or_name: a model built by :func:`kdguard.models.build_model` (or any module with a
            ``stage_presets`` dict or a built-in ``family``; DataParallel/DDP are unwrapped), or a
            name accepted by ``build_model``.
        kind: one of :data:`PRESET_KINDS` (``"stages"``, ``"pre_relu"``, ``"pre_relu_bn"``,
            ``"penultimate"``, ``"classifier"``).

    Returns:
        Dotted module paths (shallow to deep) valid for ``model.get_submodule``.

    Raises:
        KDGuardError: unknown kind, unknown model name, a model with no presets, or a preset the
            architecture does not define (e.g. ``pre_relu_bn`` for LeNet-5).
    """
    if kind not in PRESET_KINDS:
        raise KDGuardError(f"unknown stage preset {kind!r}",
                           f"choose one of: {', '.join(PRESET_KINDS)}, or pass module paths")
    model = _model_from_name(model_or_name) if isinstance(model_or_name, str) else model_or_name
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    label = getattr(model, "arch", type(model).__name__)
    custom = getattr(model, "stage_presets", None)
    if isinstance(custom, dict):
        if kind not in custom:
            raise KDGuardError(f"model {label!r} defines no {kind!r} preset in its stage_presets",
                               f"use one of {sorted(custom)} or pass module paths")
        paths = [str(p) for p in custom[kind]]
        for path in paths:
            resolve_module(model, path)  # clear error for a stale user preset
        return paths
    presets = STAGE_PRESETS.get(getattr(model, "family", None))
    if presets is None:
        if kind == "classifier":
            return [infer_classifier_path(model)]
        if kind in INFERRED_KINDS:
            return infer_stage_paths(model)
        raise KDGuardError(f"model {label!r} has no {kind!r} preset (only {', '.join(INFERRED_KINDS)} "
                           "are found by tracing a model without presets)",
                           "give the model class a stage_presets dict, e.g. "
                           "stage_presets = {'stages': ['layer1', 'layer2', 'layer3'], ...}")
    if kind not in presets:
        raise KDGuardError(f"model {label!r} has no {kind!r} preset",
                           f"use one of {', '.join(presets)} or pass module paths")
    return presets[kind](model)


#: Preset kinds :func:`stage_paths` can find by tracing a model that has no presets. ``pre_relu``
#: falls back to the stage outputs (after their ReLU), so OFD and RobustKD still run on any model.
INFERRED_KINDS = ("stages", "pre_relu", "classifier")

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def _trace(model: nn.Module, input_shape: tuple[int, int, int] | None, fix: str
           ) -> list[tuple[str, nn.Module, object]]:
    """``(path, module, output)`` of every submodule in the order they return, for one forward pass
    of a zero batch of ``input_shape`` (default ``model.input_shape``, else C of the first ``Conv2d``
    and 32×32)."""
    label = getattr(model, "arch", type(model).__name__)
    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        shape = (convs[0].in_channels if convs else 3, 32, 32)
    records: list[tuple[str, nn.Module, object]] = []

    def hook(path: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            records.append((path, module, output))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    was_training = model.training
    try:
        param = next(iter(model.parameters()), None)
        x = torch.zeros(2, *shape, device=param.device if param is not None else "cpu")
        model.eval()
        with torch.no_grad():
            model(x)
    except KDGuardError:
        raise
    except Exception as e:  # any user model error: say which model and how to avoid tracing
        raise KDGuardError(f"cannot trace the stages of model {label!r} on a {tuple(shape)} input "
                           f"({type(e).__name__}: {e})", fix) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def infer_classifier_path(model: nn.Module) -> str:
    """The classifier of a model without presets: the last ``nn.Linear`` to return in a traced
    forward pass (:func:`infer_stage_paths` traces the same way).

    Raises:
        KDGuardError: the trace fails or no ``nn.Linear`` runs.
    """
    fix = "give the model class a stage_presets dict, e.g. stage_presets = {'classifier': ['fc']}"
    linears = [path for path, module, _ in _trace(model, None, fix) if isinstance(module, nn.Linear)]
    if not linears:
        raise KDGuardError(f"model {getattr(model, 'arch', type(model).__name__)!r} runs no nn.Linear "
                           "classifier", fix)
    return linears[-1]


def infer_stage_paths(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> list[str]:
    """Stage outputs of a model without presets, found by tracing one forward pass.

    Every submodule's output is recorded in the order the modules return. Consecutive 4-D outputs
    of one spatial size form a stage, and the stage's feature is the output of the module that
    returns last at that size: for a torchvision-style ResNet that is the residual group
    (``layer1``, ``layer2``, ...), which returns after all of its blocks. Stages of 1×1 (pooled
    features) are left out.

    Args:
        model: any ``nn.Module`` taking one image batch.
        input_shape: ``(C, H, W)`` of the trace input; default ``model.input_shape`` when set,
            else C from the first ``Conv2d`` and 32×32.

    Returns:
        Module paths, shallow to deep, each at a lower resolution than the one before.

    Raises:
        KDGuardError: the trace fails or finds no 4-D stage.
    """
    label = getattr(model, "arch", type(model).__name__)
    fix = ("give the model class a stage_presets dict, e.g. "
           "stage_presets = {'stages': ['layer1', 'layer2', 'layer3']}")
    records = [(path, (int(out.shape[2]), int(out.shape[3])))
               for path, module, out in _trace(model, input_shape, fix)
               if isinstance(out, torch.Tensor) and out.dim() == 4 and not isinstance(module, _POOLS)]
    stages: list[tuple[str, tuple[int, int]]] = []
    for path, size in records:
        if stages and stages[-1][1] == size:
            stages[-1] = (path, size)  # a module returning later at the same size ends the stage
        else:
            stages.append((path, size))
    paths = [path for path, size in stages if size != (1, 1)]
    if not paths:
        raise KDGuardError(f"model {label!r} produced no 4-D feature maps to tap", fix)
    return paths
