"""The study of paper 1 (Han et al. 2024): its cells, cached probes, rows and table.

The job that runs the study, :func:`kdguard.jobs.ssl.run_grid`, prepares every teacher and
student variant once (cached under ``<out>/prep``), distils one defended encoder per cell
(``<out>/cells/<teacher>-<student>-<loss>``), probes every encoder on the downstream datasets with
the backdoor targets recorded in the poisoned encoder's manifest, and writes ``grid.md`` and
``grid.json``. Every piece is cached with the settings it was built with: re-running the same
command resumes (interrupted trainings continue from ``train_state.pt``), adding a loss or a
dataset computes only what is new, and a cache built with other settings is refused rather than
silently reused.

Cells: ``factorial`` runs every combination; ``one_at_a_time`` runs the base cell (the first teacher,
student and loss, e.g. paper 1's best: fine-tuned / warm-up / AT) and varies one component at a time.

Rows also include the poisoned encoder (the reference for the CA cost), the clean encoder if
given, each prepared teacher as an encoder and, when a cell uses it, the warm-up student before
distillation (``probe_teachers``, ``probe_students``). A cell "meets the goal" when its mean ASR
(non-target images, over the attacked datasets) is below ``asr_goal`` and its mean CA is at most
``ca_cost_goal`` below the poisoned encoder's (defaults: 15 % and 4 points).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KDGuardError, unknown_name
from ..io import read_json, write_json
from .badencoder import BackdoorTarget
from .cache import fingerprint, plain_settings
from .config import GridJob, ProbeConfig
from .defense import STUDENTS, TEACHERS
from .downstream import Downstream, evaluate_downstream, summarize
from .encoder import Encoder
from .stage_losses import LOSSES

CELL_MODES = ("factorial", "one_at_a_time")


@dataclass(frozen=True)
class Cell:
    """One configuration of the study."""

    teacher: str
    student: str
    loss: str

    @property
    def name(self) -> str:
        return f"{self.teacher}-{self.student}-{self.loss}"


def _canonical(kind: str, names: list[str], choices: dict | Any) -> list[str]:
    out = []
    for n in names:
        key = str(n).strip().lower().replace("-", "_")
        if key not in choices:
            raise unknown_name(kind, str(n), choices)
        if key not in out:
            out.append(key)
    if not out:
        raise KDGuardError(f"no {kind} given", f"list at least one of: {', '.join(choices)}")
    return out


def grid_cells(teachers: list[str], students: list[str], losses: list[str], mode: str = "factorial") -> list[Cell]:
    """The cells to run, validated and de-duplicated, in a stable order.

    Raises:
        KDGuardError: an unknown teacher/student/loss/mode or an empty list.
    """
    teachers = _canonical("teacher", teachers, TEACHERS)
    students = _canonical("student", students, STUDENTS)
    losses = _canonical("SSL distillation loss", losses, {n: None for n in LOSSES.names()})
    if mode == "factorial":
        return [Cell(t, s, l) for t, s, l in itertools.product(teachers, students, losses)]
    if mode == "one_at_a_time":
        t0, s0, l0 = teachers[0], students[0], losses[0]
        return ([Cell(t0, s0, l0)] + [Cell(t, s0, l0) for t in teachers[1:]]
                + [Cell(t0, s, l0) for s in students[1:]] + [Cell(t0, s0, l) for l in losses[1:]])
    raise KDGuardError(f"unknown cell mode {mode!r}", f"use one of {', '.join(CELL_MODES)}")


def _probe_settings(encoder: Encoder, cfg: ProbeConfig, datasets: list[str], targets: list[BackdoorTarget],
                    seed: int) -> dict:
    return plain_settings({"encoder": fingerprint(encoder), "probe": cfg, "datasets": datasets, "seed": seed,
                           "targets": [t.record() for t in targets]})


def cached_probe(directory: Path, encoder: Encoder, downstream: Downstream, targets: list[BackdoorTarget],
                 cfg: ProbeConfig, seed: int) -> dict[str, dict[str, Any]]:
    """Probe results stored in ``directory/probe.json`` if made for the same weights (fingerprint) and
    settings, else computed and stored."""
    settings = _probe_settings(encoder, cfg, list(downstream), targets, seed)
    path = directory / "probe.json"
    if path.exists():
        saved = read_json(path)
        if saved.get("settings") == settings:
            return saved["results"]
    results = evaluate_downstream(encoder, downstream, targets, cfg, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(path, {"settings": settings, "results": results})
    return results


def fingerprint_indices(indices) -> str:
    """Short digest of the clean-subset indices (int64 tensor)."""
    return hashlib.sha256(indices.numpy().tobytes()).hexdigest()[:16]


def grid_row(label: str, kind: str, results: dict, reference: dict | None, job: GridJob,
             cell: Cell | None = None) -> dict[str, Any]:
    """One row of the study's table: per-dataset results, their means, the CA cost against
    ``reference`` (the poisoned encoder's means) and, for a cell, whether it meets the goal."""
    summary = summarize(results)
    row: dict[str, Any] = {"label": label, "kind": kind, "results": results, **summary,
                           "teacher": cell.teacher if cell else None, "student": cell.student if cell else None,
                           "loss": cell.loss if cell else None}
    if reference is not None and summary["mean_ca"] is not None and reference["mean_ca"] is not None:
        row["ca_cost"] = reference["mean_ca"] - summary["mean_ca"]
    if cell is not None and "ca_cost" in row:  # the goal is a defence's; reference rows only show their cost
        row["meets_goal"] = (summary["mean_asr"] is not None and summary["mean_asr"] < job.asr_goal
                             and row["ca_cost"] <= job.ca_cost_goal)
    return row


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def grid_table(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    """Markdown table of the study's rows (:func:`kdguard.jobs.ssl.run_grid`): per dataset ``CA / ASR / ASR-all`` (%), means, CA cost."""
    head = ("| encoder | teacher | student | loss | " + " | ".join(f"{d} CA / ASR / ASR-all %" for d in datasets)
            + " | mean CA % | mean ASR % | mean ASR-all % | CA cost (pts) | goal |")
    lines = [head, "|---" * (len(datasets) + 9) + "|"]
    for r in rows:
        cells = []
        for d in datasets:
            m = r["results"].get(d)
            cells.append("—" if m is None else f"{_pct(m['ca'])} / {_pct(m.get('asr'))} / {_pct(m.get('asr_all'))}")
        cost = r.get("ca_cost")
        goal = {True: "yes", False: "no"}.get(r.get("meets_goal"), "")
        lines.append(f"| {r['label']} | {r['teacher'] or ''} | {r['student'] or ''} | {r['loss'] or ''} | "
                     + " | ".join(cells) + f" | {_pct(r['mean_ca'])} | {_pct(r['mean_asr'])} | "
                     f"{_pct(r['mean_asr_all'])} | {'' if cost is None else f'{100 * cost:.2f}'} | {goal} |")
    return "\n".join(lines)
