"""From a suite to its stage graph: every cell's stages as typed, fingerprinted jobs.

A stage's **key** is the sha256 of its job kind, its resolved config without the keys that do
not change results (:func:`kdguard.rundir.identity_config`: ``out``, devices, progress, data
roots, ...; the parent fields too) and its parents' keys. Two cells whose stages agree up to
some point share those stages (one teacher for every method distilled from it), and a stage is
computed once per key: its run directory is ``<out>/stages/<kind>-<key[:16]>``, shared by every
suite run into the same ``out``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import KDGuardError
from .schema import EVERY_STAGE, MATRIX_AFTER, Suite, applies
from .stages import JOB_KINDS, check_names


@dataclass
class StagePlan:
    """One stage of the graph, ready to run in any process."""

    key: str
    name: str                      # the stage's name in the suite (the first cell's)
    kind: str
    overrides: list[str]           # the job's key=value settings, out= included
    out: str
    parents: list[str]             # keys of the stages it reads
    threads: int
    num_cpus: float
    num_gpus: float


@dataclass
class CellPlan:
    """One cell at one seed: the keys of its stages, roots first (the last is the method's)."""

    cell: str
    axes: dict[str, str]
    method: str
    seed: int
    stages: list[str]
    stage_names: list[str]


@dataclass
class SuitePlan:
    suite: Suite
    scale: str
    seeds: list[int]
    out: Path
    cells: list[CellPlan]
    stages: dict[str, StagePlan] = field(default_factory=dict)  # in dependency order

    def stage_dir(self, key: str) -> Path:
        return Path(self.stages[key].out)


def _merge(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    for k, v in (extra or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


def to_overrides(values: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested mapping as ``key=value`` overrides; values are written as JSON (valid YAML), so
    ``"off"`` stays text and ``[0.5, 0.75]`` a list. Mappings are flattened (they update the
    schema's mapping key by key); an empty one is written whole."""
    out: list[str] = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += to_overrides(v, f"{key}.")
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def stage_key(kind: str, job: Any, parent_refs: dict[str, str]) -> str:
    """The stage's fingerprint (module docstring); ``parent_refs``: parent field → ``KEY[/FILE]``."""
    from ..config import to_dict
    from ..rundir import identity_config, job_kind

    config = to_dict(job)
    body = {"kind": kind, "job": job_kind(job),
            "config": identity_config(config, parents=tuple(parent_refs)),
            "parents": parent_refs, "kdguard": __version__}
    # a run directory ignores where a data-free run stops (it resumes from there), but a stage
    # stopped early is another artefact than the finished run: a fork continues its checkpoint
    stop_after = (config.get("schedule") or {}).get("stop_after") if isinstance(config, dict) else None
    if stop_after is not None:
        body["stop_after"] = stop_after
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def stage_settings(suite: Suite, stage: str, axes: dict[str, str], scale: str) -> dict[str, Any]:
    """The suite's settings of ``stage`` for one cell: ``config`` ← matrix values ← scale."""
    spec = suite.spec

    def layer(values: dict[str, Any], per_target: dict[str, Any]) -> dict[str, Any]:
        # "*" first, then lists of stages, then the stage by its own name: the most specific wins
        ranked = sorted(per_target, key=lambda t: (t != EVERY_STAGE, t != stage))
        for target in ranked:
            if target != MATRIX_AFTER and applies(target, stage):
                values = _merge(values, per_target[target])
        return values

    values = _merge({}, spec.stages[stage].config)
    for axis, value in axes.items():
        values = layer(values, spec.matrix[axis][value] or {})
    return layer(values, spec.scales.get(scale) or {})


def plan_suite(suite: Suite, *, scale: str = "cpu", seeds: list[int] | None = None, only: str | None = None,
               out: str | Path = "runs/suites", threads: int | None = None,
               gpus: float | None = None) -> SuitePlan:
    """Build every stage of the cells selected (typed and checked jobs) and their keys.

    Args:
        scale: ``cpu`` (the suite's settings as written) or a name under its ``scales:``.
        seeds: the seeds (None: the suite's).
        only: fnmatch pattern(s), comma-separated, of cell names (``badnets/*``, ``*/zskt``); a
            pattern without a wildcard also matches the cells it is a part of (``zskt``).
        out: the stage cache; stage run directories go to ``out/stages/``.
        threads: torch threads of every stage (None: each stage's ``num_cpus``, at least 1).
        gpus: Ray GPUs of every stage (None: each stage's ``num_gpus``); fractions pack stages.

    Raises:
        KDGuardError: an unknown scale, no cell matching ``only``, or a stage whose job settings
            are wrong (unknown key or value, unknown attack/trigger, method or defence).
    """
    if scale not in suite.scale_names:
        raise KDGuardError(f"suite {suite.name!r} has no scale {scale!r}",
                           f"use --scale {' or --scale '.join(suite.scale_names)}")
    seeds = list(suite.spec.seeds if seeds is None else seeds)
    if not seeds:
        raise KDGuardError("no seeds given", "pass --seeds 0,1,2 or give the suite seeds:")
    cells = suite.cells()
    if only:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        cells = [c for c in cells if any(_matches(c[0], p) for p in patterns)]
        if not cells:
            raise KDGuardError(f"--only {only!r} matches no cell of suite {suite.name!r}",
                               f"`kdguard suite list {suite.name}` prints its cells")
    out = Path(out).expanduser()
    plan = SuitePlan(suite, scale, seeds, out, [])
    built: dict[tuple, tuple[str, Any]] = {}
    for cell, axes, method in cells:
        for seed in seeds:
            keys: dict[str, str] = {}
            for name in suite.chain(method, axes):
                keys[name] = _plan_stage(plan, name, axes, seed, keys, built, threads, gpus, cell)
            plan.cells.append(CellPlan(cell, axes, method, seed, list(keys.values()), list(keys)))
    return plan


def _matches(cell: str, pattern: str) -> bool:
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(cell, pattern)
    return cell == pattern or pattern in cell.split("/")


def _plan_stage(plan: SuitePlan, name: str, axes: dict[str, str], seed: int, keys: dict[str, str],
                built: dict[tuple, tuple[str, Any]], threads: int | None, gpus: float | None, cell: str) -> str:
    suite = plan.suite
    stage = suite.spec.stages[name]
    kind = JOB_KINDS[stage.job]
    values = stage_settings(suite, name, axes, plan.scale)
    if stage.seeded:
        values["seed"] = seed
    refs: dict[str, str] = {}
    links: dict[str, str] = {}
    if stage.parent:
        refs[kind.parent] = keys[stage.parent]
        links[kind.parent] = plan.stages[keys[stage.parent]].out
    for field_key, ref in suite.after_of(name, axes).items():
        parent, _, file = ref.partition("/")
        refs[field_key] = keys[parent] + (f"/{file}" if file else "")
        links[field_key] = str(Path(plan.stages[keys[parent]].out) / file) if file else plan.stages[keys[parent]].out
    overrides = to_overrides(values) + [f"{k}={json.dumps(v)}" for k, v in links.items()]
    memo = (name, tuple(overrides))
    if memo in built:
        return built[memo][0]
    where = f"suite {suite.name!r}, cell {cell!r}, stage {name!r}"
    try:
        job = kind.build([*overrides, "out=\"-\""])
        check_names(stage.job, job)
    except KDGuardError as e:
        raise KDGuardError(f"{where}: {e.problem}", e.fix) from None
    key = stage_key(stage.job, job, refs)
    built[memo] = (key, job)
    if key not in plan.stages:
        out = plan.out / "stages" / f"{stage.job}-{key[:16]}"
        plan.stages[key] = StagePlan(
            key=key, name=name, kind=stage.job, overrides=[*overrides, f"out={json.dumps(str(out))}"],
            out=str(out), parents=[keys[p] for p in suite.parents(name, axes)],
            threads=threads or max(1, int(stage.num_cpus)), num_cpus=stage.num_cpus,
            num_gpus=stage.num_gpus if gpus is None else gpus)
    return key
