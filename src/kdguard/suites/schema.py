"""Suite files: typed schema, loading and validation.

A suite is a YAML file (shipped ones under ``kdguard/configs/suites/``, or any path) that
describes a grid of experiments as stages of kdguard jobs::

    description: one line
    seeds: [0, 1, 2]                  # default seeds (--seeds replaces them)
    stages:                           # name → one job of the stage graph
      teacher:
        job: teacher                  # a job kind (kdguard.suites.stages.JOB_KINDS)
        config: {model: lenet5, train: {epochs: 2}}   # the job's settings (its dataclass keys)
      kd:
        job: distill
        parent: teacher               # the job's parent field (here ``teacher``) ← that stage
        config: {kd: {method: kd}}
    methods: [kd]                     # the cells' last stages (one column of the grid)
    matrix:                           # axis → value → stage name(s) → settings ("*": every stage,
                                      # "kd,at": both stages)
      trigger:
        badnets: {teacher: {attack: {name: badnets}}}
        learned:                      # "after": stage → {dotted key: STAGE[/FILE]} for this value's cells
          teacher: {attack: {name: robustkd_blend}}
          after: {teacher: {attack.params.file: trigger/trigger.safetensors}}
    exclude: ["blend/zskt"]           # fnmatch patterns of cell names left out of the grid
    scales:                           # --scale NAME → stage name (or "*") → settings
      paper: {teacher: {model: wrn16_2}}

A **cell** is one value of every matrix axis and one method, named ``value/.../method``
(``badnets/kd``), run once per seed. Its stages are the method's stage and its ancestors
(``parent``/``after``). A stage's settings are, lowest first: the job's defaults (and, for
``datafree``, its method's preset), ``config``, the matrix values', the scale's, then ``seed``
(for a ``seeded`` stage) and the parents' run directories.

The file is data (:mod:`kdguard.trust`): an import path (``pkg.mod:attr``) or an interpolation
(``${...}``) anywhere in it is refused. Every stage of every cell is built into its typed job
when the suite loads, so an unknown key, job kind, attack/trigger, KD method, data-free method or
defence is one :class:`~kdguard.errors.KDGuardError` before anything runs.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import user_layer
from ..errors import KDGuardError, unknown_name

#: the folder of shipped suites inside the package
SUITE_DIR = ("configs", "suites")
#: the key of a matrix value or scale that applies to every stage of a cell
EVERY_STAGE = "*"
#: the key of a matrix value that adds ``after:`` references to its cells' stages
MATRIX_AFTER = "after"


@dataclass
class StageSpec:
    """One stage of the graph: a job and where its parent weights come from."""

    job: str = MISSING                     # a job kind: teacher, distill, datafree, defend, robustkd, ...
    parent: Optional[str] = None           # stage whose run directory fills the job's parent field
    after: dict[str, str] = field(default_factory=dict)  # dotted key → "STAGE" or "STAGE/FILE" in it
    config: dict[str, Any] = field(default_factory=dict)  # the job's settings
    seeded: bool = True                    # set the job's ``seed`` to the cell's seed
    num_cpus: float = 1.0                  # Ray resources; also torch threads (at least 1)
    num_gpus: float = 0.0                  # fractional GPUs pack small stages on one device


@dataclass
class SuiteSpec:
    """A suite file (see the module docstring)."""

    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    stages: dict[str, StageSpec] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    matrix: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_by: Optional[str] = None         # axis whose values the report's scatter plots split by
                                           # (null: the method)


@dataclass
class Suite:
    """A loaded, checked suite: its name, source and spec."""

    name: str
    source: str
    spec: SuiteSpec

    @property
    def scale_names(self) -> list[str]:
        return ["cpu", *sorted(s for s in self.spec.scales if s != "cpu")]

    def cells(self) -> list[tuple[str, dict[str, str], str]]:
        """``(cell name, {axis: value}, method)`` of every cell, in matrix order."""
        axes = list(self.spec.matrix)
        out = []
        for values in itertools.product(*(list(self.spec.matrix[a]) for a in axes)):
            for method in self.spec.methods:
                name = "/".join([*values, method])
                if not any(fnmatch.fnmatchcase(name, p) for p in self.spec.exclude):
                    out.append((name, dict(zip(axes, values)), method))
        return out

    def after_of(self, stage: str, axes: dict[str, str] | None = None) -> dict[str, str]:
        """``stage``'s ``after:`` references in a cell with matrix values ``axes``: the stage's
        own, then each value's ``after: {stage: {...}}`` (later ones win)."""
        refs = dict(self.spec.stages[stage].after)
        for axis, value in (axes or {}).items():
            extra = (self.spec.matrix[axis][value] or {}).get(MATRIX_AFTER) or {}
            refs.update(extra.get(stage) or {})
        return refs

    def parents(self, stage: str, axes: dict[str, str] | None = None) -> list[str]:
        """The stage names ``stage`` reads from in a cell with matrix values ``axes`` (``parent``
        first, then ``after``; without ``axes``, the stage's own references)."""
        spec = self.spec.stages[stage]
        names = [spec.parent] if spec.parent else []
        names += [ref.split("/", 1)[0] for ref in self.after_of(stage, axes).values()]
        return list(dict.fromkeys(names))

    def chain(self, method: str, axes: dict[str, str] | None = None) -> list[str]:
        """The stages of ``method``'s cells (with matrix values ``axes``), roots first."""
        order: list[str] = []

        def visit(name: str) -> None:
            for parent in self.parents(name, axes):
                visit(parent)
            if name not in order:
                order.append(name)

        visit(method)
        return order


def target_stages(target: str) -> list[str]:
    """The stage names of a matrix or scale target: ``"kd"``, ``"kd,at"`` or ``"*"``."""
    return [t.strip() for t in target.split(",") if t.strip()]


def applies(target: str, stage: str) -> bool:
    """Whether the settings under ``target`` apply to ``stage``."""
    names = target_stages(target)
    return EVERY_STAGE in names or stage in names


def shipped_suites() -> list[str]:
    """Names of the suites shipped with kdguard, sorted."""
    node = files("kdguard").joinpath(*SUITE_DIR)
    return sorted(p.name[:-len(".yaml")] for p in node.iterdir() if p.name.endswith(".yaml"))


def suite_path(name: str) -> tuple[str, Any]:
    """``(suite name, readable file)`` for a shipped suite name or a path to a YAML file.

    Raises:
        KDGuardError: neither a shipped suite nor an existing file.
    """
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise KDGuardError(f"suite file {name!r} does not exist",
                               f"check the path, or name a shipped suite: {', '.join(shipped_suites())}")
        return path.stem, path
    node = files("kdguard").joinpath(*SUITE_DIR, f"{name}.yaml")
    if not node.is_file():
        raise unknown_name("suite", name, shipped_suites())
    return name, node


def load_suite(name: str) -> Suite:
    """Read and check suite ``name`` (a shipped suite or a YAML path).

    Checks the file's keys and types against :class:`SuiteSpec`, then the graph (job kinds,
    stage names, methods, matrix and scale targets, no cycles); the stages' job settings are
    checked by :func:`kdguard.suites.plan.plan_suite`, which builds every job.

    Raises:
        KDGuardError: one line naming the first problem and its fix.
    """
    suite_name, node = suite_path(name)
    source = str(node)
    if isinstance(node, Path):
        layer = user_layer(node)
    else:  # a shipped file: read it through the same checks as a user's file
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / f"{suite_name}.yaml"
            copy.write_text(node.read_text(encoding="utf-8"))
            layer = user_layer(copy)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SuiteSpec), layer)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise KDGuardError(f"suite {suite_name!r}: {missing[0]!r} is not given",
                               "give every stage a job: (e.g. job: teacher)")
        spec: SuiteSpec = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        msg = " ".join(str(e).splitlines()[0].split())
        raise KDGuardError(f"suite {suite_name!r} is not a valid suite file ({msg})",
                           "keep to the keys of docs/suites.md (description, seeds, stages, methods, "
                           "matrix, exclude, scales, group_by)") from None
    suite = Suite(suite_name, source, spec)
    check_graph(suite)
    return suite


def check_graph(suite: Suite) -> None:
    """Check the suite's structure (not the jobs' settings).

    Raises:
        KDGuardError: an unknown job kind, stage, method, axis target or scale name; a stage
            that is its own ancestor; no methods; an empty axis.
    """
    from .stages import JOB_KINDS

    spec, name = suite.spec, suite.name
    if not spec.stages:
        raise KDGuardError(f"suite {name!r} has no stages", "add a stages: section (docs/suites.md)")
    for stage_name, stage in spec.stages.items():
        if stage_name in (MATRIX_AFTER, EVERY_STAGE):
            raise KDGuardError(f"suite {name!r}: a stage is called {stage_name!r}, a reserved name",
                               "rename the stage")
        if stage.job not in JOB_KINDS:
            raise unknown_name(f"job kind of stage {stage_name!r} in suite {name!r}:", stage.job, JOB_KINDS)
        for parent in suite.parents(stage_name):
            if parent not in spec.stages:
                raise unknown_name(f"parent stage of {stage_name!r} in suite {name!r}:", parent, spec.stages)
        if stage.parent and not JOB_KINDS[stage.job].parent:
            raise KDGuardError(f"suite {name!r}: stage {stage_name!r} (job {stage.job}) has a parent, "
                               "but that job reads no parent weights", "drop parent:, or use after: KEY: STAGE")
        if stage.num_cpus <= 0 or stage.num_gpus < 0:
            raise KDGuardError(f"suite {name!r}: stage {stage_name!r} asks for num_cpus={stage.num_cpus}, "
                               f"num_gpus={stage.num_gpus}", "give num_cpus > 0 and num_gpus >= 0")
    if not spec.methods:
        raise KDGuardError(f"suite {name!r} names no methods", "list the cells' last stages under methods:")
    for method in spec.methods:
        if method not in spec.stages:
            raise unknown_name(f"method of suite {name!r} (a stage name):", method, spec.stages)
    targets = {*spec.stages, EVERY_STAGE}
    for axis, values in spec.matrix.items():
        if not values:
            raise KDGuardError(f"suite {name!r}: matrix axis {axis!r} has no values", "give it at least one")
        for value, per_stage in values.items():
            if "/" in value:
                raise KDGuardError(f"suite {name!r}: matrix value {value!r} holds '/'",
                                   "name matrix values without '/' (it separates a cell's parts)")
            for target in per_stage or {}:
                if target == MATRIX_AFTER:
                    _check_matrix_after(suite, f"{axis}={value}", per_stage[target])
                    continue
                for part in target_stages(target):
                    if part not in targets:
                        raise unknown_name(f"stage of matrix value {axis}={value} in suite {name!r}:", part, targets)
    for scale, per_stage in spec.scales.items():
        for target in per_stage or {}:
            for part in target_stages(target):
                if part not in targets:
                    raise unknown_name(f"stage of scale {scale!r} in suite {name!r}:", part, targets)
    if spec.group_by is not None and spec.group_by not in spec.matrix:
        raise unknown_name(f"group_by axis of suite {name!r}:", spec.group_by, spec.matrix)
    if not suite.cells():
        raise KDGuardError(f"suite {name!r} has no cells left after exclude:", "loosen its exclude patterns")
    _check_acyclic(suite)


def _check_matrix_after(suite: Suite, where: str, block: Any) -> None:
    """A matrix value's ``after: {STAGE: {KEY: "STAGE[/FILE]"}}``."""
    fix = "write after: {STAGE: {dotted.key: STAGE/FILE}} (docs/suites.md)"
    if not isinstance(block, dict):
        raise KDGuardError(f"suite {suite.name!r}: after: of matrix value {where} is not a mapping", fix)
    for stage, refs in block.items():
        if stage not in suite.spec.stages:
            raise unknown_name(f"stage under after: of matrix value {where} in suite {suite.name!r}:",
                               stage, suite.spec.stages)
        if not isinstance(refs, dict) or not all(isinstance(v, str) for v in refs.values()):
            raise KDGuardError(f"suite {suite.name!r}: after: {stage} of matrix value {where} is not "
                               "a mapping of keys to STAGE[/FILE]", fix)
        for ref in refs.values():
            parent = ref.split("/", 1)[0]
            if parent not in suite.spec.stages:
                raise unknown_name(f"stage referred to by after: {stage} of matrix value {where} in suite "
                                   f"{suite.name!r}:", parent, suite.spec.stages)


def _check_acyclic(suite: Suite) -> None:
    # per distinct combination of matrix values: a value's after: may add edges
    combos = {tuple(sorted(axes.items())) for _, axes, _ in suite.cells()} or {()}
    for combo in sorted(combos):
        axes = dict(combo)
        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                loop = " -> ".join([*path[path.index(name):], name])
                raise KDGuardError(f"suite {suite.name!r}: stages depend on each other in a circle ({loop})",
                                   "make every parent: / after: point to an earlier stage")
            state[name] = 1
            for parent in suite.parents(name, axes):
                visit(parent, [*path, name])
            state[name] = 2

        for name in suite.spec.stages:
            visit(name, [])
