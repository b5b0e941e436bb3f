"""Poisoning a training set with a trigger, and the labels a backdoor test uses.

An attack is a trigger plus a label policy plus a poison rate (:class:`AttackSpec`).
:func:`poison_dataset` picks the images to poison from its own seeded RNG stream, applies the
trigger batch-wise and relabels them; the result (:class:`PoisonedDataset`) keeps each sample's
original label and poison flag, and the chosen indices can be saved with the run and replayed.

**What the poison rate means** (``AttackSpec.poison_rate``, in (0, 1]):

* ``dirty_label``: the fraction of the **whole training set** that is poisoned,
  ``round(rate · N)`` images, drawn from the non-target-class images (all-to-one) or from all
  images (all-to-all), triggered and relabelled. This is the ABD / BackdoorBench convention
  (ABD: 10 % of CIFAR-10's training set, drawn from non-target classes).
* ``clean_label``: the fraction of the **target-class images** that get the trigger,
  ``round(rate · N_target)``; labels are unchanged. Note that BackdoorBench reads its ``pratio``
  for clean-label attacks as a fraction of the whole training set, drawn from the target class
  (SCLBD/BackdoorBench issues #13 and #36), and ABD poisons ``min(10 % of the training set, all
  target-class images)``, i.e. every target-class image on CIFAR-10 and GTSRB, which is rate 1.0
  here. Convert before comparing numbers across tools.

Selection differs from the ABD reference code on purpose: ABD takes the *first* eligible images
in dataset order; kdguard draws them uniformly at random (as BackdoorBench does) from a
``torch.Generator`` seeded with the poisoning seed only, so the choice does not depend on, or
disturb, the global RNG used for training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.dataset import ImageDataset
from ..errors import KDGuardError, check_range, unknown_name
from ..presets import load_table
from .triggers import TRIGGERS, FunctionTrigger, Trigger, build_trigger, load_trigger_function
from .triggers.validate import as_choice, as_int

LABEL_MODES = ("all_to_one", "all_to_all")
POISONING_MODES = ("dirty_label", "clean_label")
# Images triggered per chunk: bounds the float32 working copy (4096 CIFAR images ≈ 50 MB).
TRIGGER_BATCH = 4096
_INDEX_FORMAT = "kdguard.poison_indices/1"


@dataclass
class AttackSpec:
    """A backdoor attack: trigger, target, label policy and poison rate.

    Attributes:
        trigger: the :class:`Trigger` applied to poisoned and backdoor-test images.
        target: target class for ``all_to_one`` and ``clean_label`` (ignored by all-to-all).
        label_mode: ``"all_to_one"`` (poisoned label = ``target``) or ``"all_to_all"``
            (poisoned label = ``(y + 1) mod K``).
        poisoning: ``"dirty_label"`` (relabel poisoned images) or ``"clean_label"`` (trigger only
            target-class images, keep labels; all-to-one only).
        poison_rate: in (0, 1]; its meaning depends on ``poisoning`` (see the module docstring).
            None: unknown or not applicable, as for an attack given only to trigger test images
            (a foreign teacher's trigger): run records and reports then show no rate. Poisoning
            such a spec uses ``preset_rate`` and records it here (:func:`poison_dataset`).
        name: preset or trigger name, for reports.
        preset_rate: the preset's rate, used to poison when ``poison_rate`` is None.

    Raises:
        KDGuardError: a rate outside (0, 1], unknown mode, negative target, or clean-label with
            all-to-all (which has no single target class to draw from).
    """

    trigger: Trigger
    target: int = 0
    label_mode: str = "all_to_one"
    poisoning: str = "dirty_label"
    poison_rate: float | None = 0.1
    name: str = ""
    preset_rate: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.trigger, Trigger):
            raise KDGuardError(f"attack trigger {self.trigger!r} is not a Trigger",
                               "build one with build_trigger(name, image_shape)")
        self.target = as_int("attack", "target", self.target, 0)
        self.label_mode = as_choice("attack", "label_mode", self.label_mode, LABEL_MODES)
        self.poisoning = as_choice("attack", "poisoning", self.poisoning, POISONING_MODES)
        self.poison_rate = _rate(self.poison_rate)
        self.preset_rate = _rate(self.preset_rate)
        if self.poisoning == "clean_label" and self.label_mode == "all_to_all":
            raise KDGuardError("clean-label poisoning cannot be all-to-all",
                               "set attack.label_mode=all_to_one with a target class, or "
                               "attack.poisoning=dirty_label")
        if not self.name:
            self.name = self.trigger.name

    def params(self) -> dict[str, Any]:
        """JSON-serialisable description; :meth:`from_params` rebuilds the spec."""
        return {"name": self.name, "trigger": self.trigger.params(), "target": self.target,
                "label_mode": self.label_mode, "poisoning": self.poisoning,
                "poison_rate": self.poison_rate}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "AttackSpec":
        """Inverse of :meth:`params`. Raises KDGuardError for a malformed dict."""
        try:
            trigger = build_trigger(**params["trigger"])
            rest = {k: params[k] for k in ("target", "label_mode", "poisoning", "poison_rate")}
        except (KeyError, TypeError) as err:
            raise KDGuardError(f"attack description is missing or malformed ({err})",
                               "give the dict written by AttackSpec.params()") from None
        return cls(trigger=trigger, name=params.get("name", ""), **rest)

    def rate_to_poison(self) -> float:
        """The rate a poisoning uses: ``poison_rate``, else ``preset_rate``.

        Raises:
            KDGuardError: neither is known.
        """
        rate = self.poison_rate if self.poison_rate is not None else self.preset_rate
        if rate is None:
            raise KDGuardError(f"attack {self.name!r} has no poison rate",
                               "set attack.poison_rate to a fraction in (0, 1], e.g. 0.1")
        return rate


def _rate(rate: Any) -> float | None:
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate):
        raise KDGuardError(f"poison rate {rate!r} is not a number",
                           "give a fraction in (0, 1], e.g. 0.1")
    return float(check_range("poison rate", rate, 0.0, 1.0, low_open=True))


# --- labels for backdoor tests --------------------------------------------------------------

def backdoor_targets(labels: torch.Tensor, spec: AttackSpec, num_classes: int) -> torch.Tensor:
    """Labels a backdoored model should predict on triggered images.

    Args:
        labels: ``int64`` ``N``, the images' true labels.
        spec: the attack; all-to-one and clean-label → ``target``; all-to-all → ``(y + 1) mod K``.
        num_classes: ``K``.

    Returns:
        ``int64`` ``N`` on ``labels``' device.
    """
    if spec.label_mode == "all_to_all":
        return (labels.long() + 1) % num_classes
    return torch.full_like(labels, spec.target, dtype=torch.long)


def non_target_mask(labels: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """``bool`` ``N``: images that count for ASR (non-target classes only, as in the ABD reference
    code and BackdoorBench).

    All-to-one / clean-label: ``labels != target``; all-to-all: every image.
    """
    if spec.label_mode == "all_to_all":
        return torch.ones_like(labels, dtype=torch.bool)
    return labels != spec.target


def trigger_images(trigger: Trigger, images: torch.Tensor,
                   batch_size: int = TRIGGER_BATCH) -> torch.Tensor:
    """Apply ``trigger`` to ``images`` (``N×C×H×W``, uint8 or float) chunk by chunk.

    Returns a new tensor of the same dtype, shape and device; bounds the float working memory.
    """
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], batch_size):
        out[start:start + batch_size] = trigger(images[start:start + batch_size])
    return out


def backdoor_test_set(ds: ImageDataset, spec: AttackSpec,
                      include_target: bool = False) -> ImageDataset:
    """Triggered copies of the test images, **keeping their original labels**.

    ASR = accuracy against ``backdoor_targets(labels, spec, K)``; RA (robust accuracy) =
    accuracy against the returned labels. By default images for which :func:`non_target_mask`
    is False (the target class, all-to-one) are dropped, as in ABD and BackdoorBench.
    """
    _check_shape(ds, spec)
    keep = torch.ones(len(ds), dtype=torch.bool) if include_target else non_target_mask(
        ds.labels, spec)
    idx = keep.nonzero().squeeze(1)
    images = trigger_images(spec.trigger, ds.images[idx])
    return ds.with_images(images, ds.labels[idx].clone())


# --- poisoning ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoisonedDataset:
    """A poisoned training set and its provenance.

    Attributes:
        dataset: :class:`ImageDataset` with poisoned images and the *training* labels.
        original_labels: ``int64`` ``N``, labels before poisoning.
        poison_flags: ``bool`` ``N``, True for poisoned samples.
        poison_indices: ``int64``, sorted indices of the poisoned samples.
        spec: the attack that produced it (None when unknown).
        seed: the poisoning seed (None when the indices were given).
    """

    dataset: ImageDataset
    original_labels: torch.Tensor
    poison_flags: torch.Tensor
    poison_indices: torch.Tensor
    spec: AttackSpec | None = field(default=None, compare=False)
    seed: int | None = None

    def as_dataset(self) -> ImageDataset:
        """The poisoned :class:`ImageDataset` to train on."""
        return self.dataset

    @property
    def num_poisoned(self) -> int:
        return int(self.poison_indices.numel())

    def save_indices(self, path: str | Path) -> Path:
        """Write the poison indices (plus attack, seed and dataset size) as JSON; returns the path.

        The file lets a run be replayed exactly with :meth:`load`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format": _INDEX_FORMAT, "dataset": self.dataset.name,
                  "num_samples": len(self.dataset), "seed": self.seed,
                  "attack": self.spec.params() if self.spec is not None else None,
                  "poison_indices": self.poison_indices.tolist()}
        path.write_text(json.dumps(record))
        return path

    @staticmethod
    def read_indices(path: str | Path) -> dict[str, Any]:
        """Read a file written by :meth:`save_indices`.

        Returns ``{"poison_indices": int64 tensor, "num_samples": int, "seed", "attack", ...}``.

        Raises:
            KDGuardError: missing or malformed file.
        """
        path = Path(path)
        if not path.is_file():
            raise KDGuardError(f"poison index file {str(path)!r} does not exist",
                               "give the poison_indices.json saved with the run")
        try:
            record = json.loads(path.read_text())
            ok = record.get("format") == _INDEX_FORMAT
            indices = torch.tensor(record["poison_indices"], dtype=torch.long)
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError,
                RuntimeError):
            ok = False
        if not ok:
            raise KDGuardError(f"{str(path)!r} is not a kdguard poison index file",
                               "give a file written by PoisonedDataset.save_indices")
        record["poison_indices"] = indices
        return record

    @classmethod
    def load(cls, path: str | Path, ds: ImageDataset,
             spec: AttackSpec | None = None) -> "PoisonedDataset":
        """Replay a saved poisoning on the clean dataset ``ds``.

        ``spec`` defaults to the attack stored in the file.

        Raises:
            KDGuardError: bad file, dataset size differs from the saved one, no attack known.
        """
        record = cls.read_indices(path)
        if record.get("num_samples") != len(ds):
            raise KDGuardError(
                f"poison index file {str(path)!r} was saved for {record.get('num_samples')} "
                f"images but dataset {ds.name!r} has {len(ds)}",
                "load it with the same training split (same hold-out fraction and seed)")
        if spec is None:
            if record.get("attack") is None:
                raise KDGuardError(f"poison index file {str(path)!r} records no attack",
                                   "pass the attack: PoisonedDataset.load(path, ds, spec=AttackSpec(...))")
            spec = AttackSpec.from_params(record["attack"])
        poisoned = apply_poison(ds, spec, record["poison_indices"])
        return PoisonedDataset(poisoned.dataset, poisoned.original_labels,
                               poisoned.poison_flags, poisoned.poison_indices, spec,
                               record.get("seed"))


def eligible_indices(labels: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """``int64`` indices that may be poisoned: non-target (dirty all-to-one), all (dirty
    all-to-all), or target-class (clean-label) images."""
    if spec.poisoning == "clean_label":
        return (labels == spec.target).nonzero().squeeze(1)
    if spec.label_mode == "all_to_all":
        return torch.arange(labels.numel())
    return (labels != spec.target).nonzero().squeeze(1)


def poison_count(labels: torch.Tensor, spec: AttackSpec) -> int:
    """Number of images to poison: ``round(rate · N)`` (dirty-label) or ``round(rate ·
    N_target)`` (clean-label), Python's ``round``; ``rate`` is :meth:`AttackSpec.rate_to_poison`.

    Raises:
        KDGuardError: no rate known, the count is 0, or it exceeds the eligible pool.
    """
    rate = spec.rate_to_poison()
    pool = int(eligible_indices(labels, spec).numel())
    base = pool if spec.poisoning == "clean_label" else int(labels.numel())
    count = round(rate * base)
    what = "target-class images" if spec.poisoning == "clean_label" else "training images"
    if base == 0:
        raise KDGuardError(f"there are no {what} to poison (target class {spec.target})",
                           "check the dataset and the attack target")
    if count == 0:
        raise KDGuardError(f"poison rate {rate} of {base} {what} rounds to 0 images",
                           f"give a rate of at least {1 / base:.3g}")
    if count > pool:
        raise KDGuardError(
            f"poison rate {rate} asks for {count} poisoned images but only {pool} "
            f"non-target-class images are eligible", f"give a rate of at most {pool / base:.4g}")
    return count


def select_poison_indices(labels: torch.Tensor, spec: AttackSpec, seed: int) -> torch.Tensor:
    """Sorted ``int64`` indices of the images to poison, uniform without replacement.

    Uses a private ``torch.Generator`` seeded with ``seed``: independent of ``torch.manual_seed``.
    """
    seed = as_int("poisoning", "seed", seed, 0)
    pool = eligible_indices(labels.cpu(), spec)
    count = poison_count(labels.cpu(), spec)
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(pool.numel(), generator=gen)[:count]].sort().values


def apply_poison(ds: ImageDataset, spec: AttackSpec, indices: torch.Tensor) -> PoisonedDataset:
    """Poison the given rows of ``ds``: trigger their images and relabel them per ``spec``.

    Dirty-label all-to-one → ``target``; all-to-all → ``(y + 1) mod K``; clean-label → unchanged.

    Raises:
        KDGuardError: indices out of range or repeated, target not a class of ``ds``,
            trigger built for another image shape.
    """
    _check_shape(ds, spec)
    n = len(ds)
    idx = torch.as_tensor(indices, dtype=torch.long).flatten().sort().values
    if idx.numel() and (idx[0] < 0 or idx[-1] >= n):
        raise KDGuardError(f"poison indices range over [{idx[0]}, {idx[-1]}] but dataset "
                           f"{ds.name!r} has {n} images", "give indices in [0, N)")
    if idx.unique().numel() != idx.numel():
        raise KDGuardError("poison indices contain repeats", "give each index once")
    flags = torch.zeros(n, dtype=torch.bool)
    flags[idx] = True
    if spec.poisoning == "clean_label" and bool((ds.labels[idx] != spec.target).any()):
        raise KDGuardError("clean-label poison indices include non-target-class images",
                           f"give indices of class {spec.target} only")
    images = ds.images.clone()
    images[idx] = trigger_images(spec.trigger, ds.images[idx])
    labels = ds.labels.clone()
    if spec.poisoning == "dirty_label":
        labels[idx] = backdoor_targets(ds.labels[idx], spec, ds.num_classes)
    return PoisonedDataset(ds.with_images(images, labels), ds.labels.clone(), flags, idx, spec)


def poison_dataset(ds: ImageDataset, spec: AttackSpec, seed: int) -> PoisonedDataset:
    """Poison a training set: :func:`select_poison_indices` then :func:`apply_poison`.

    Args:
        ds: clean training set (uint8 images).
        spec: the attack; ``spec.trigger`` must be built for ``ds.shape``.
        seed: poisoning seed (≥ 0); the same seed gives the same indices whatever the global RNG.

    Returns:
        :class:`PoisonedDataset`; ``ds`` is not modified. A ``spec`` whose ``poison_rate`` is
        None is poisoned at its ``preset_rate``, which is then set as its ``poison_rate``: a
        spec states a rate once it has poisoned a training set with it.

    Raises:
        KDGuardError: target not a class of ``ds``, no rate known, rate giving 0 images or more
            than the eligible pool, trigger/image shape mismatch.
    """
    _check_shape(ds, spec)
    indices = select_poison_indices(ds.labels, spec, seed)
    spec.poison_rate = spec.rate_to_poison()
    poisoned = apply_poison(ds, spec, indices)
    return PoisonedDataset(poisoned.dataset, poisoned.original_labels, poisoned.poison_flags,
                           poisoned.poison_indices, spec, seed)


def _check_shape(ds: ImageDataset, spec: AttackSpec) -> None:
    if tuple(ds.shape) != spec.trigger.image_shape:
        raise KDGuardError(
            f"trigger {spec.trigger.name!r} was built for images {spec.trigger.image_shape} but "
            f"dataset {ds.name!r} has images {tuple(ds.shape)}",
            "build the trigger with build_trigger(name, image_shape=dataset.shape)")
    if spec.label_mode == "all_to_one" and spec.target >= ds.num_classes:
        raise KDGuardError(f"attack target {spec.target} is not a class of dataset {ds.name!r} "
                           f"({ds.num_classes} classes)",
                           f"give a target in [0, {ds.num_classes - 1}]")


# --- presets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttackPreset:
    """Defaults of a named attack: trigger name and parameters, poisoning mode and rate."""

    trigger: str
    poisoning: str = "dirty_label"
    poison_rate: float = 0.1
    trigger_params: dict[str, Any] = field(default_factory=dict)
    source: str = ""


#: Named attacks, from the shipped file ``kdguard/configs/attacks.yaml`` (each entry names its source).
ATTACK_PRESETS: dict[str, AttackPreset] = {
    name: AttackPreset(**values)
    for name, values in load_table("attacks.yaml", AttackPreset, complete=True).items()}


def build_attack(name: str | Callable[[torch.Tensor], torch.Tensor], image_shape: tuple[int, int, int],
                 target: int = 0, poison_rate: float | None = None, seed: int = 0,
                 label_mode: str = "all_to_one", poisoning: str | None = None,
                 **trigger_params: Any) -> AttackSpec:
    """Build an :class:`AttackSpec` from a preset of :data:`ATTACK_PRESETS`, a trigger name, or
    the user's own trigger function.

    Presets win over trigger names of the same spelling (``"sig"`` is the clean-label preset).
    A raw trigger name defaults to dirty-label at rate 0.1. ``trigger_params`` override the
    preset's trigger parameters; ``seed`` seeds the trigger's pattern (not the poison indices,
    which :func:`poison_dataset` draws from its own seed).

    ``name`` may be an import path ``"pkg.mod:fn"`` (imported here: pass only a name the user
    typed, never one read from a file) or a callable; either becomes a
    :class:`~.triggers.FunctionTrigger` (``fn(float N×C×H×W in [0, 1]) -> same``), dirty-label at
    rate 0.1 by default, without trigger parameters.

    Raises:
        KDGuardError: unknown name (lists presets and triggers), a function that cannot be
            imported, unknown trigger parameter, or any invalid value.
    """
    if callable(name) or (isinstance(name, str) and ":" in name):
        if trigger_params:
            raise KDGuardError(f"trigger function {name!r} takes no parameters, got "
                               f"{', '.join(sorted(trigger_params))}",
                               "drop attack.params, or bind them in your function (functools.partial)")
        fn = load_trigger_function(name.strip()) if isinstance(name, str) else name
        trigger = FunctionTrigger(image_shape, seed=seed, fn=fn,
                                  label=name.strip() if isinstance(name, str) else None)
        preset = AttackPreset(trigger.name)
        return AttackSpec(trigger=trigger, target=target, label_mode=label_mode,
                          poisoning=poisoning or preset.poisoning,
                          poison_rate=preset.poison_rate if poison_rate is None else poison_rate,
                          name=trigger.name, preset_rate=preset.poison_rate)
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key in ATTACK_PRESETS:
        preset = ATTACK_PRESETS[key]
    elif isinstance(name, str) and name in TRIGGERS:
        key = TRIGGERS.resolve(name)
        preset = AttackPreset(key)
    else:
        raise unknown_name("attack", str(name), set(ATTACK_PRESETS) | set(TRIGGERS.names()))
    trigger = build_trigger(preset.trigger, image_shape, seed=seed,
                            **{**preset.trigger_params, **trigger_params})
    return AttackSpec(trigger=trigger, target=target, label_mode=label_mode,
                      poisoning=poisoning or preset.poisoning,
                      poison_rate=preset.poison_rate if poison_rate is None else poison_rate,
                      name=key, preset_rate=preset.poison_rate)
