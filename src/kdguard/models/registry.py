"""The model registry and :func:`build_model`, the one way the rest of kdguard makes a model.

Names are case-insensitive and ``-``/``_`` are interchangeable (``"WRN-16-2"`` = ``"wrn16_2"``'s
alias ``"wrn_16_2"``). Besides the registered names, :func:`build_model` accepts

* any ``"wrn-D-K"`` / ``"wrnD_K"`` with (D − 4) divisible by 6 (a WRN-D-K, Zagoruyko &
  Komodakis 2016), and
* ``"package.module:factory"``, an import path to a user function or class returning an
  ``nn.Module``.

Every registry entry is a factory ``(num_classes, in_channels=3, mean=None, std=None, **options)``
whose model takes ``float`` images in ``[0, 1]`` (``N×C×H×W``), normalises them inside, and
records its registry name in ``model.arch``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from ..errors import KDGuardError, unknown_name
from ..registry import Registry
from . import lenet, mobilenetv2, resnet, resnet_cifar, vgg, wrn
from .common import Stats, check_model_args

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

# (name, factory, family, aliases, one-line description for `kdguard list`)
_BUILTINS: tuple[tuple[str, ModelFactory, str, tuple[str, ...], str], ...] = (
    ("resnet8", resnet_cifar.resnet8, "resnet_cifar", (), "CIFAR ResNet-8, 0.078M params"),
    ("resnet20", resnet_cifar.resnet20, "resnet_cifar", (), "CIFAR ResNet-20, 0.27M params"),
    ("resnet32", resnet_cifar.resnet32, "resnet_cifar", (), "CIFAR ResNet-32, 0.47M params"),
    ("resnet56", resnet_cifar.resnet56, "resnet_cifar", (), "CIFAR ResNet-56, 0.86M params"),
    ("resnet18", resnet.resnet18, "resnet", ("resnet-18",), "ResNet-18 (CIFAR stem), 11.2M params"),
    ("wrn16_1", wrn.wrn16_1, "wrn", ("wrn-16-1",), "Wide ResNet 16-1, 0.18M params"),
    ("wrn16_2", wrn.wrn16_2, "wrn", ("wrn-16-2",), "Wide ResNet 16-2, 0.69M params"),
    ("wrn16_4", wrn.wrn16_4, "wrn", ("wrn-16-4",), "Wide ResNet 16-4, 2.7M params"),
    ("wrn28_2", wrn.wrn28_2, "wrn", ("wrn-28-2",), "Wide ResNet 28-2, 1.5M params"),
    ("wrn28_4", wrn.wrn28_4, "wrn", ("wrn-28-4",), "Wide ResNet 28-4, 5.8M params"),
    ("wrn40_1", wrn.wrn40_1, "wrn", ("wrn-40-1",), "Wide ResNet 40-1, 0.56M params"),
    ("wrn40_2", wrn.wrn40_2, "wrn", ("wrn-40-2",), "Wide ResNet 40-2, 2.2M params"),
    ("mobilenetv2", mobilenetv2.mobilenetv2, "mobilenetv2", ("mobilenet_v2",),
     "MobileNetV2 (CIFAR strides), 2.2M params"),
    ("mobilenetv2_x0_5", mobilenetv2.mobilenetv2_x0_5, "mobilenetv2", ("mobilenet_v2_x0_5",),
     "MobileNetV2 width 0.5 (CIFAR strides), 0.7M params"),
    ("vgg11_bn", vgg.vgg11_bn, "vgg", ("vgg11bn",), "VGG-11 with BN, CIFAR head, 9.2M params"),
    ("vgg13_bn", vgg.vgg13_bn, "vgg", ("vgg13bn",), "VGG-13 with BN, CIFAR head, 9.4M params"),
    ("vgg16_bn", vgg.vgg16_bn, "vgg", ("vgg16bn",), "VGG-16 with BN, CIFAR head, 14.7M params"),
    ("vgg19_bn", vgg.vgg19_bn, "vgg", ("vgg19bn",), "VGG-19 with BN, CIFAR head, 20.0M params"),
    ("lenet5", lenet.lenet5, "lenet", ("lenet", "lenet-5"), "LeNet-5 (ReLU, max-pool), 62k params"),
)

for _name, _factory, _family, _aliases, _description in _BUILTINS:
    MODELS.add(_name, _factory, aliases=_aliases, family=_family, description=_description)

_WRN_NAME = re.compile(r"^wrn_?(\d+)_(\d+)$")

#: Name forms accepted besides the registered names (shown in "unknown model" errors).
EXTRA_NAME_FORMS = ("wrn-<depth>-<width>", "package.module:factory")


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_factory(name: str) -> tuple[str, ModelFactory]:
    """Return ``(canonical name, factory)`` for a registered name or a ``wrn-D-K`` name.

    Raises:
        KDGuardError: the name is unknown (import paths are handled by :func:`build_model`).
    """
    if name in MODELS:
        return MODELS.resolve(name), MODELS.get(name)
    match = _WRN_NAME.match(_key(name))
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        return f"wrn{depth}_{width}", partial(wrn.wide_resnet, depth, width)
    raise unknown_name("model", name, [*MODELS.names(), *EXTRA_NAME_FORMS])


def build_model(name: str, *, num_classes: int, in_channels: int = 3, mean: Stats = None,
                std: Stats = None, **options: Any) -> nn.Module:
    """Build a freshly initialised model by registry name or import path.

    Args:
        name: a registered name (``kdguard list``; e.g. ``"resnet20"``, ``"wrn-16-2"``,
            ``"mobilenetv2"``, ``"vgg16_bn"``, ``"lenet5"``, ``"resnet18"``), any
            ``"wrn-D-K"``, or ``"package.module:factory"``.
        num_classes: logits per image, ``>= 2``.
        in_channels: 1 or 3.
        mean, std: per-channel dataset statistics in the 0–1 scale (``ImageDataset.mean``/
            ``.std``); ``None`` maps ``[0, 1]`` to ``[-1, 1]``.
        **options: architecture options, e.g. ``shortcut="A"`` (CIFAR ResNets),
            ``drop_rate=0.3`` (WRN), ``width_mult=0.5`` (MobileNetV2).

    Returns:
        An ``nn.Module`` in train mode mapping ``float N×C×H×W`` in ``[0, 1]`` to ``N×num_classes``
        logits. ``model.arch`` (built-ins: the canonical registry name) and
        ``model.arch_options`` (the ``options`` given) are set, so
        ``build_model(model.arch, **model.arch_options, num_classes=..., ...)`` rebuilds the same
        architecture, e.g. when loading a checkpoint.

    For an import path, the factory receives ``num_classes``/``in_channels`` (and ``mean``/``std``
    when given) only if its signature accepts them; a user model that does not take ``mean``/
    ``std`` must normalise its input itself. ``model.arch`` is set to the import path unless the
    model already defines it; give the model a ``stage_presets`` dict (preset → module paths) to
    make :func:`kdguard.models.stages.stage_paths` work for it.

    Raises:
        KDGuardError: unknown name; bad ``num_classes``/``in_channels``/``mean``/``std``; an
            option the architecture does not take; an import path whose module or attribute does
            not exist, is not callable, or does not return an ``nn.Module``.
    """
    if not isinstance(name, str) or not name.strip():
        raise KDGuardError(f"model name {name!r} is not a non-empty string",
                           "give a registered name such as 'resnet20' or 'package.module:factory'")
    check_model_args(num_classes, in_channels, mean, std)
    if ":" in name:
        return _build_from_import_path(name.strip(), num_classes, in_channels, mean, std, options)
    canonical, factory = resolve_factory(name)
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **options)
    _check_options(canonical, factory, kwargs)
    model = factory(**kwargs)
    model.arch = canonical
    model.arch_options = dict(options)
    return model


def _accepted_options(factory: ModelFactory) -> list[str]:
    fixed = {"num_classes", "in_channels", "mean", "std"}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    return [p for p in params if p not in fixed and params[p].kind is not inspect.Parameter.VAR_KEYWORD]


def _check_options(label: str, factory: ModelFactory, kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        accepted = _accepted_options(factory)
        extra = sorted(set(kwargs) - set(accepted) - {"num_classes", "in_channels", "mean", "std"})
        if extra:
            raise KDGuardError(f"model {label!r} does not take option(s) {', '.join(map(repr, extra))}",
                               f"its options are: {', '.join(accepted) or 'none'}") from None
        raise KDGuardError(f"model factory {label!r} cannot be called with {sorted(kwargs)} ({err})",
                           "give its required arguments as options") from None
    except ValueError:  # no introspectable signature (some builtins): let the call decide
        pass


def _import_factory(path: str) -> ModelFactory:
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise KDGuardError(f"model import path {path!r} is not of the form 'package.module:factory'",
                           "write e.g. 'mypkg.nets:small_cnn'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise KDGuardError(f"cannot import module {module_name!r} of model {path!r} ({err})",
                           "check the spelling and that the package is installed or on PYTHONPATH"
                           ) from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
            raise KDGuardError(f"{module_name!r} has no attribute {attr_path!r} (model {path!r})",
                               f"name a function or class defined there, e.g. one of: "
                               f"{', '.join(public) or '(none)'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KDGuardError(f"model factory {path!r} is a {type(obj).__name__}, not callable",
                           "point to a function or nn.Module class that returns the model")
    return obj


def _build_from_import_path(path: str, num_classes: int, in_channels: int, mean: Stats, std: Stats,
                            options: dict[str, Any]) -> nn.Module:
    factory = _import_factory(path)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = dict(options)
    offered = {"num_classes": num_classes, "in_channels": in_channels}
    offered.update({k: v for k, v in (("mean", mean), ("std", std)) if v is not None})
    for key, value in offered.items():
        if takes_any or key in params:
            kwargs[key] = value
    _check_options(path, factory, kwargs)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise KDGuardError(f"model factory {path!r} returned a value of type "
                           f"{type(model).__name__}, not an nn.Module",
                           "make the factory return a torch.nn.Module")
    if not isinstance(getattr(model, "arch", None), str):
        model.arch = path
    model.arch_options = dict(options)
    return model


def model_info(name: str) -> dict[str, Any]:
    """Metadata of a registered model: ``{"name", "family", "description"}``.

    Raises:
        KDGuardError: unknown name.
    """
    canonical = MODELS.resolve(name)
    return {"name": canonical, **MODELS.meta(canonical)}
