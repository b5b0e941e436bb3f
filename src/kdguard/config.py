"""Typed run configurations (OmegaConf structured configs).

A job's config is a dataclass tree; it can be loaded from YAML and overridden from the command
line with dotted ``key=value`` items (``train.epochs=30 model=resnet20``). Types are checked:
``train.epochs=abc`` is rejected with a one-line error. Defaults carry the values of the
reference papers where one applies (named in comments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import KDGuardError
from .trust import import_paths_in, interpolations_in

T = TypeVar("T")


@dataclass
class DataConfig:
    name: str = "mnist_embedded"          # a registered dataset (`kdguard list`)
    root: Optional[str] = None             # data root; else $KDGUARD_DATA_ROOT
    val_fraction: float = 0.05             # held out of train for model selection / curves
    augment: bool = True                   # batched random crop (pad 4) + flip where it applies


@dataclass
class AttackConfig:
    name: Optional[str] = "badnets"        # preset or trigger name; null = clean training
    target: int = 0                        # ABD uses target 0 on CIFAR-10
    poison_rate: Optional[float] = None    # null = the preset's default (10 % dirty-label)
    label_mode: str = "all_to_one"         # or all_to_all (y → y+1 mod K)
    poisoning: Optional[str] = None        # dirty_label / clean_label; null = preset default
    seed: int = 0                          # trigger pattern and poisoned-index RNG stream
    params: dict[str, Any] = field(default_factory=dict)  # trigger parameters


@dataclass
class OptimConfig:
    """One optimiser and its learning-rate schedule (:mod:`kdguard.optim`), for every job:
    ``train.optim`` of the epoch loops and the data-free ``student_optim``/``generator_optim``."""

    name: str = "sgd"                      # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9                  # sgd only
    weight_decay: float = 5e-4
    nesterov: bool = False                 # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam only (PyTorch default)
    schedule: str = "cosine"               # cosine | multistep | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    gamma: float = 0.1                     # multistep decay factor
    warmup_epochs: float = 0.0             # linear warm-up (epoch loops; data-free runs refuse it)
    grad_clip: Optional[float] = None      # max global grad norm of a data-free optimiser (ZSKT: 5);
                                           # epoch loops take train.grad_clip


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=OptimConfig)
    amp: str = "auto"                      # bf16 autocast: auto | on | off
    channels_last: str = "auto"            # auto | on | off
    device: str = "auto"
    eval_batch_size: int = 512
    grad_clip: Optional[float] = None
    progress: bool = True


@dataclass
class TeacherSpec:
    """How to build a teacher from a bare weights file (a kdguard run directory needs none of it).

    ``arch`` may be an import path (``pkg.mod:factory``) only when given on the command line
    (``--teacher-arch``) or in Python: a config file naming one is refused (:mod:`kdguard.trust`).
    """

    arch: Optional[str] = None             # registry name, wrn-D-K, or pkg.mod:factory (--teacher-arch)
    num_classes: Optional[int] = None      # logits (--num-classes)
    in_channels: Optional[int] = None      # 1 or 3 (--in-channels)
    input_norm: Optional[str] = None       # MEAN/STD or imagenet|cifar10|half for a model expecting
                                           # normalised input (--teacher-input-norm); null = [0, 1] input


@dataclass
class TeacherJob:
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    model: str = "lenet5"
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out: str = "runs/teacher"


@dataclass
class KDConfig:
    method: str = "kd"                     # a registered KD method (`kdguard list`), or "at+kd"
    temperature: float = 4.0               # method "kd" only: Hinton et al. 2015
    alpha: float = 0.9                     # method "kd" only: weight of KD; CE gets 1 − α
    weights: dict[str, float] = field(default_factory=dict)  # per-term weights, e.g. {at: 1000, kd: 1}
    options: dict[str, Any] = field(default_factory=dict)    # method options, e.g. {variant: nad}


@dataclass
class DistillJob:
    teacher: str = MISSING                 # checkpoint directory or weights file
    teacher_spec: TeacherSpec = field(default_factory=TeacherSpec)  # for a bare weights file
    data: DataConfig = field(default_factory=DataConfig)
    attack: Optional[AttackConfig] = None  # null = the attack recorded in the teacher's manifest
    student: str = "lenet5"
    clean_fraction: float = 0.2            # share of the training split the defender holds (ABD: 20 %)
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    out: str = "runs/student"


#: words YAML 1.1 reads as booleans besides true/false (kept as text in ``key=value`` overrides)
YAML11_BOOL_WORDS = frozenset({"on", "off", "yes", "no"})


def _load_yaml_layer(path: Path) -> DictConfig:
    """The mapping in YAML file ``path``, unresolved; every way it can be unreadable is one
    :class:`KDGuardError`."""
    if not path.exists():
        raise KDGuardError(f"config file {str(path)!r} does not exist", "check the path")
    if not path.is_file():
        raise KDGuardError(f"config file {str(path)!r} is not a file", "pass a YAML file to --config")
    try:
        loaded = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KDGuardError(f"config file {str(path)!r} is not readable YAML ({first})",
                           "fix its syntax (key: value lines), or pass settings as key=value") from None
    if not isinstance(loaded, DictConfig):
        raise KDGuardError(f"config file {str(path)!r} holds a {type(loaded).__name__.replace('Config', '').lower()}, "
                           "not a mapping of settings", "write it as key: value lines, e.g. 'seed: 1'")
    return loaded


def _check_no_interpolation(tree: Any, source: str) -> None:
    found = interpolations_in(tree)
    if found:
        key, value = found[0]
        raise KDGuardError(f"{source} sets {key} to {value!r}, an interpolation (${{...}}); kdguard does "
                           "not resolve interpolations, which can read the environment",
                           f"write the value itself, e.g. {key}=VALUE")


def user_layer(yaml_path: str | Path | None = None, overrides: list[str] | None = None, *,
               example: str = "train.epochs=30") -> DictConfig:
    """The user's settings: YAML file ← ``key=value`` overrides, untyped (types and key names are
    checked when the layer is merged onto a schema).

    The file is data (:mod:`kdguard.trust`): an import path (``pkg.mod:attr``) in it is refused
    unless an override on the command line sets the same key, and interpolations (``${...}``) are
    refused in the file and in overrides alike.

    Args:
        example: an override shown in the fix of a malformed one.

    Raises:
        KDGuardError: missing, unreadable or non-mapping YAML file; an override without ``=``; an
            interpolation; an import path read from the file.
    """
    user = OmegaConf.create({})
    file_paths: list[tuple[str, str]] = []
    if yaml_path is not None:
        path = Path(yaml_path)
        loaded = _load_yaml_layer(path)
        raw = OmegaConf.to_container(loaded, resolve=False)
        _check_no_interpolation(raw, f"config file {str(path)!r}")
        file_paths = import_paths_in(raw)
        try:
            user = OmegaConf.merge(user, loaded)
        except OmegaConfBaseException as e:
            raise KDGuardError(f"config file {str(path)!r} cannot be read as settings "
                               f"({str(e).splitlines()[0]})", "write it as key: value lines") from None
    overridden: set[str] = set()
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise KDGuardError(f"override {bad[0]!r} is not of the form key=value", f"write e.g. {example}")
        for override in overrides:  # one at a time: a later override of the same key wins
            key, _, value = override.partition("=")
            key = key.strip()
            if "${" in value:
                raise KDGuardError(f"override {override!r} holds an interpolation (${{...}}); kdguard does "
                                   "not resolve interpolations, which can read the environment",
                                   f"write the value itself, e.g. {key}=VALUE")
            overridden.add(key)
            try:
                if value.strip().lower() in YAML11_BOOL_WORDS:
                    # YAML 1.1 reads on/off/yes/no as booleans, which would turn a choice such as
                    # abd.mode=off into the text "False"; as text they still set a boolean field
                    # (OmegaConf converts them)
                    OmegaConf.update(user, key, value.strip(), merge=True)
                else:
                    user = OmegaConf.merge(user, OmegaConf.from_dotlist([override]))
            except (OmegaConfBaseException, yaml.YAMLError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise KDGuardError(f"override {override!r} cannot be read ({first})",
                                   f"write it as key=value, e.g. {example}") from None
    for key, value in file_paths:
        if key not in overridden:
            raise KDGuardError(f"config file {str(yaml_path)!r} sets {key} to {value!r}, an import path; "
                               "kdguard never imports code named by a file",
                               f"pass {key}={value} on the command line if you trust that code")
    return user


def require_complete(cfg: DictConfig, fix: str = "pass {key}=VALUE or set it in the YAML file") -> None:
    """Raise :class:`KDGuardError` naming the first required (``MISSING``) setting of ``cfg``
    that is not given; ``fix`` is formatted with ``key``."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise KDGuardError(f"required setting {missing[0]!r} is not given", fix.format(key=missing[0]))


def build_config(schema: type[T], yaml_path: str | Path | None = None,
                 overrides: list[str] | None = None) -> T:
    """Merge ``schema`` defaults ← YAML file ← ``key=value`` overrides; return a typed object.

    Raises:
        KDGuardError: missing YAML file, unknown key, wrong type, or a missing required value.
    """
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), user_layer(yaml_path, overrides))
        require_complete(cfg)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise KDGuardError(f"invalid configuration: {msg}",
                           "check key names and value types against `kdguard <command> --help`") from None
    except TypeError:  # OmegaConf merges a dict onto a list this way: `targets.0.target=3`
        indexed = next((o.partition("=")[0] for o in overrides or ()
                        if any(part.isdigit() for part in o.partition("=")[0].split("."))), None)
        if indexed is None:
            raise KDGuardError("invalid configuration: a setting holds a mapping where a list belongs, "
                               "or a list where a mapping belongs",
                               "check key names and value types against `kdguard <command> --help`") from None
        head = indexed.split(".")[0]
        raise KDGuardError(f"invalid configuration: override {indexed!r} sets one item of the list "
                           f"{head!r}; kdguard sets a list whole",
                           f"write the whole list in YAML flow style: {head}='[...]'") from None


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
