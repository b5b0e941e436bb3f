"""An attack from its configuration, and the record of it a run's manifest keeps.

:func:`make_attack` builds the :class:`~kdguard.attacks.poison.AttackSpec` of an
:class:`~kdguard.config.AttackConfig` (a job's ``attack`` section); :func:`attack_record` is the
manifest's ``attack`` entry and :func:`attack_from_manifest` reads it back as data (never
importing code a file names).
"""

from __future__ import annotations

from typing import Any

from ..config import AttackConfig, to_dict
from ..errors import KDGuardError
from ..trust import refuse_code_from_file
from .poison import AttackSpec, build_attack


def make_attack(cfg: AttackConfig | None, shape: tuple[int, int, int], num_classes: int) -> AttackSpec | None:
    """The :class:`AttackSpec` of ``cfg`` for images of ``shape`` (None for no attack).

    ``cfg.name`` may be a preset, a trigger name, or ``pkg.mod:fn`` (the user's trigger
    function, imported here: ``cfg`` must come from the user, not from a file; see
    :func:`attack_from_manifest`). The spec's ``poison_rate`` is ``cfg.poison_rate``: None when
    not given, so a run that only evaluates the attack records no rate; :func:`poison_dataset`
    poisons such a spec at the preset's rate and records that.

    Raises:
        KDGuardError: a target outside ``[0, num_classes)``, or anything :func:`build_attack` refuses.
    """
    if cfg is None or cfg.name in (None, "", "none", "clean"):
        return None
    if not 0 <= cfg.target < num_classes:
        raise KDGuardError(f"target class {cfg.target} is outside [0, {num_classes - 1}]",
                           f"set attack.target to a class index below {num_classes}")
    kwargs: dict[str, Any] = dict(image_shape=shape, target=cfg.target, seed=cfg.seed,
                                  label_mode=cfg.label_mode, **dict(cfg.params))
    if cfg.poison_rate is not None:
        kwargs["poison_rate"] = cfg.poison_rate
    if cfg.poisoning is not None:
        kwargs["poisoning"] = cfg.poisoning
    spec = build_attack(cfg.name, **kwargs)
    spec.poison_rate = cfg.poison_rate  # the preset's default stays in spec.preset_rate
    return spec



def attack_record(cfg: AttackConfig | None, attack: AttackSpec | None) -> dict[str, Any] | None:
    """The manifest's ``attack`` entry, in the form :func:`attack_from_manifest` reads.

    ``poison_rate`` is ``attack.poison_rate``: the rate this run poisoned its training set with
    (train-teacher), the rate copied from the teacher's manifest, or the one the user set in
    ``attack.poison_rate``; None (unknown, not applicable) for an attack given only to evaluate
    a model, never a preset's default the teacher may not have used.
    """
    if attack is None or cfg is None:
        return None
    return {"config": to_dict(cfg), "trigger": attack.trigger.params(), "target": attack.target,
            "label_mode": attack.label_mode, "poisoning": attack.poisoning,
            "poison_rate": attack.poison_rate}


_ATTACK_FIELDS = {"name": (str, type(None)), "target": (int,), "poison_rate": (int, float, type(None)),
                  "label_mode": (str,), "poisoning": (str, type(None)), "seed": (int,), "params": (dict,)}


def attack_from_manifest(manifest: dict[str, Any], *, source: str = "the run's manifest") -> AttackConfig | None:
    """The attack recorded in a run's manifest (:func:`attack_record`), as an :class:`AttackConfig`.

    The manifest is data: an attack whose name (or trigger's name) is an import path
    ``pkg.mod:fn`` is refused before anything is imported, and the record's values are
    type-checked. ``poison_rate`` is the record's resolved rate (None when it has none), and
    parameters naming files (``Trigger.file_params``: resolved paths and their sha256) come from
    the trigger record, so a changed file is refused when the trigger is rebuilt.

    Args:
        manifest: the parsed ``manifest.json``.
        source: the manifest, for messages (e.g. its path).

    Returns:
        None when the manifest records no attack.

    Raises:
        KDGuardError: a malformed record, or one naming a trigger function.
    """
    from .triggers import TRIGGERS

    rec = manifest.get("attack") if isinstance(manifest, dict) else None
    if not rec:
        return None
    config = rec.get("config") if isinstance(rec, dict) else None
    fix = "re-create the run, or give the attack on the command line (attack.name=..., or --attack for evaluate)"
    if not isinstance(config, dict):
        raise KDGuardError(f"{source} has a malformed attack record (no config mapping)", fix)
    trigger = rec.get("trigger") if isinstance(rec.get("trigger"), dict) else {}
    for name in (config.get("name"), trigger.get("name")):
        refuse_code_from_file(name, what="trigger function", source=source,
                              fix=f"pass attack.name={name} (or --attack {name} for evaluate) on the command line")
    for key, value in config.items():
        allowed = _ATTACK_FIELDS.get(key)
        if allowed is None or isinstance(value, bool) or not isinstance(value, allowed):
            raise KDGuardError(f"{source} has a malformed attack record (config.{key} = {value!r})", fix)
    config = {**config, "params": dict(config.get("params") or {})}
    rate = rec.get("poison_rate", config.get("poison_rate"))
    config["poison_rate"] = rate if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None
    name = trigger.get("name")
    if isinstance(name, str) and name in TRIGGERS:
        for key in TRIGGERS.get(name).file_params:
            if key in trigger:
                config["params"][key] = trigger[key]
    return AttackConfig(**config)
