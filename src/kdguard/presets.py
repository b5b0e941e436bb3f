"""Presets and protocols shipped with kdguard as YAML files under ``kdguard/configs/``.

A shipped file is one *table*: a mapping of entry names to values of a typed schema (an OmegaConf
structured dataclass). Each entry is checked against the schema when the file is loaded: an
unknown key or a value of the wrong type is an error at once, not when a job first uses it.
An entry may be partial (a preset that sets some fields of a job and leaves the rest to the
schema's defaults); :func:`load_table` returns exactly the keys an entry sets, with the schema's
types (``5`` in a float field comes back as ``5.0``).

The files ship with the package (trusted), yet nothing read from them is imported: they hold
values only. User YAML files go through :func:`kdguard.config.user_layer` instead.

==============================  =============================================================
``datafree/<method>.yaml``      data-free recipes: ``common`` + ``cpu`` / ``paper`` scale
                                (:func:`kdguard.datafree.config.preset_values`)
``attacks.yaml``                named attacks (:data:`kdguard.attacks.ATTACK_PRESETS`)
``robustkd/pairs.yaml``         RobustKD teacher → student pairs
``robustkd/training.yaml``      RobustKD's reference distillation protocol (``paper``)
``suites/<name>.yaml``          experiment suites, read by :func:`kdguard.suites.load_suite`
                                (their own schema, not tables)
==============================  =============================================================
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import KDGuardError

#: the folder of shipped YAML files inside the package
CONFIG_DIR = "configs"


def shipped_files() -> list[str]:
    """Names (``datafree/cmi.yaml``) of every YAML file under ``kdguard/configs/``, sorted."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml"):
                found.append(f"{prefix}{child.name}")

    walk(files("kdguard").joinpath(CONFIG_DIR), "")
    return sorted(found)


def _read(name: str) -> DictConfig:
    node = files("kdguard").joinpath(CONFIG_DIR, *name.split("/"))
    if not node.is_file():
        raise KDGuardError(f"kdguard ships no config file {name!r}",
                           f"use one of: {', '.join(shipped_files())}")
    try:
        loaded = OmegaConf.create(node.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise KDGuardError(f"shipped config file {name!r} is not readable YAML ({str(e).splitlines()[0]})",
                           "reinstall kdguard") from None
    if not isinstance(loaded, DictConfig):
        raise KDGuardError(f"shipped config file {name!r} is not a mapping", "reinstall kdguard")
    return loaded


def _typed_subset(given: Any, merged: Any) -> Any:
    """The keys of ``given`` with the (type-converted) values they have in ``merged``."""
    if isinstance(given, dict) and isinstance(merged, DictConfig):
        return {key: _typed_subset(value, merged[key]) for key, value in given.items()}
    return OmegaConf.to_container(merged, resolve=False) if OmegaConf.is_config(merged) else merged


def load_table(name: str, schema: type, *, complete: bool = False) -> dict[str, dict[str, Any]]:
    """Entry name → the values it sets, for shipped file ``name`` checked against ``schema``.

    Args:
        name: path under ``kdguard/configs/``, e.g. ``"datafree/cmi.yaml"``.
        schema: a dataclass; every entry of the file must merge onto it.
        complete: also require every field without a default (``MISSING``) to be set.

    Raises:
        KDGuardError: no such file, unreadable YAML, or an entry with an unknown key, a value of
            the wrong type or (``complete``) a missing required field.
    """
    table = _read(name)
    out: dict[str, dict[str, Any]] = {}
    for entry, values in table.items():
        if not isinstance(values, DictConfig):
            raise KDGuardError(f"shipped config file {name!r}: entry {entry!r} is not a mapping",
                               "reinstall kdguard")
        try:
            base = OmegaConf.structured(schema)
            OmegaConf.set_readonly(base, False)  # frozen dataclasses merge like the others
            merged = OmegaConf.merge(base, values)
            missing = sorted(OmegaConf.missing_keys(merged)) if complete else []
        except OmegaConfBaseException as e:
            raise KDGuardError(f"shipped config file {name!r}, entry {entry!r}: {str(e).splitlines()[0]}",
                               f"keep its keys to those of {schema.__name__}") from None
        if missing:
            raise KDGuardError(f"shipped config file {name!r}, entry {entry!r} does not set {missing[0]!r}",
                               f"give every required field of {schema.__name__}")
        out[str(entry)] = _typed_subset(OmegaConf.to_container(values, resolve=False), merged)
    return out
