"""The committed ledger (``results/``) reproduces the tables printed before the suites existed.

``data/datafree_transfer_report_{transfer,abd}.md`` are the outputs of the earlier benchmark
script's ``--report`` (the data-free transfer and the ABD tables, seed 0) on the ledger the
records of ``results/datafree-transfer`` and ``results/abd`` were converted from. Every number
that both reports print is compared: per cell the student's CA, ASR, no-trigger rate and train
minutes, and the teacher's CA and ASR; the peak ASR and the ABD paper's reference, which the suite
report does not print, are compared with the records.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from kdguard.config import to_dict
from kdguard.rundir import identity_config
from kdguard.suites import load_suite, plan_suite, write_report
from kdguard.suites.ledger import read_records
from kdguard.suites.stages import JOB_KINDS

ROOT = Path(__file__).resolve().parents[2]
LEDGER = ROOT / "results"
DATA = Path(__file__).parent / "data"
#: the earlier report's attack labels and method names → the suites' axis values and method stages
ATTACKS = {"BadNets grid 3×3": "badnets", "Trojan 3×3": "trojan_3x3", "Trojan watermark": "trojan_wm",
           "Blend": "blend", "Blend (cartoon pattern)": "blend_cartoon", "SIG (clean-label)": "sig_abd"}


def _method(old: str) -> str:
    return old.replace("+", "_")


def _rows(md: str, header: str) -> list[list[str]]:
    """The body rows of the pipe table whose header line starts with ``header``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def old_report(table: str) -> tuple[dict[tuple[str, int], dict], dict[str, tuple[str, str]]]:
    """(cell, seed) → the earlier report's numbers, and attack → its teacher's (CA, ASR) text."""
    md = (DATA / f"datafree_transfer_report_{table}.md").read_text()
    cells = {}
    for attack, method, seed, ca, asr, no_trigger, peak, ref, minutes, source in _rows(md, "| attack | method |"):
        assert source == "ledger"
        cells[(f"{ATTACKS[attack]}/{_method(method)}", int(seed))] = {
            "ca": ca, "asr": asr, "no_trigger": no_trigger, "peak": peak, "ref": ref, "minutes": minutes}
    teachers = {}
    for m in re.finditer(r"^\| teacher \((.+)\) \| \w+ \| ([\d.]+) \| ([\d.]+) \|", md, re.M):
        teachers[ATTACKS[m.group(1)]] = (m.group(2), m.group(3))
    return cells, teachers


def new_report(suite: str, tmp_path: Path) -> dict[tuple[str, int], dict]:
    """(cell, seed) → the suite report's per-seed row."""
    md, _, _ = write_report(load_suite(suite), LEDGER, tmp_path / suite)
    text = md.read_text()
    assert "Refused records" not in text
    rows = {}
    for cell, seed, ca, asr, no_trigger, _target_ca, t_ca, t_asr, digest, minutes in _rows(text, "| cell | seed |"):
        rows[(cell, int(seed))] = {"ca": ca, "asr": asr, "no_trigger": no_trigger, "t_ca": t_ca, "t_asr": t_asr,
                                   "digest": digest, "minutes": minutes}
    return rows


@pytest.mark.parametrize(("suite", "table", "not_recorded"),
                         [("datafree-transfer", "transfer", {"badnets/ood"}), ("abd", "abd", set())])
def test_suite_report_reproduces_the_earlier_table(suite, table, not_recorded, tmp_path):
    old, teachers = old_report(table)
    new = new_report(suite, tmp_path)
    assert set(new) == set(old)
    assert {c for c, _, _ in load_suite(suite).cells()} - {c for c, _ in new} == not_recorded
    for key, o in old.items():
        n = new[key]
        assert (n["ca"], n["asr"], n["no_trigger"], n["minutes"]) == (o["ca"], o["asr"], o["no_trigger"],
                                                                      o["minutes"]), key
        t_ca, t_asr = teachers[key[0].split("/")[0]]  # printed with two decimals there, one here
        assert (n["t_ca"], n["t_asr"]) == (f"{float(t_ca):.1f}", f"{float(t_asr):.1f}"), key
    records, refused = read_records(LEDGER, suite)
    assert not refused
    for r in records:
        o = old[(r["cell"], r["seed"])]
        m = r["metrics"]
        peak = "—" if "peak_asr" not in m else f"{100 * m['peak_asr']:.1f} ({m['peak_asr_round']})"
        assert peak == o["peak"], r["cell"]
        ref = r["converted"]["abd_reference"]
        assert ("—" if ref is None else f"{ref[0]} / {ref[1]}") == o["ref"], r["cell"]


@pytest.mark.parametrize("suite", ["datafree-transfer", "abd"])
def test_converted_records_and_their_teachers(suite):
    """Every converted record is marked so, names no invented fingerprint or curve, and its
    teacher is the ledger's copy (weights digest) of a run with the config of the suite's teacher
    stage at seed 0 (the stage key itself also holds the kdguard version, so it is not compared)."""
    plan = plan_suite(load_suite(suite), seeds=[0], out="runs/suites")
    teacher_jobs = {}
    for c in plan.cells:
        sp = plan.stages[c.stages[0]]
        teacher_jobs[c.cell] = identity_config(to_dict(JOB_KINDS[sp.kind].build(sp.overrides)), parents=())
    records, _ = read_records(LEDGER, suite)
    assert records
    for r in records:
        assert r["converted"]["missing"] == ["fingerprint", "curve"]
        assert r["fingerprint"] is None and r["curve"] == []
        key = r["teacher"]["fingerprint"]
        stored = LEDGER / suite / "teachers" / f"teacher-{key[:16]}"
        config = yaml.safe_load((stored / "config.yaml").read_text())
        assert identity_config(config, parents=()) == teacher_jobs[r["cell"]], r["cell"]
        digest = hashlib.sha256((stored / "model.safetensors").read_bytes()).hexdigest()
        assert digest == r["teacher"]["sha256"] == (stored / "sha256.txt").read_text().split()[0]
        assert json.loads((stored / "suite_stage.json").read_text())["key"] == key


def test_abd_demo_seeds_suite_runs_the_demo_jobs(tmp_path):
    """The ``abd-demo-seeds`` suite's teacher and its ZSKT / ZSKT + ABD students are the demo's
    jobs (:mod:`kdguard.jobs.demo`), up to the keys that cannot change results."""
    from kdguard.jobs.demo import DEMO_ABD, demo_datafree_job, demo_jobs

    plan = plan_suite(load_suite("abd-demo-seeds"), seeds=[1], out=tmp_path)

    def identity(stage_key: str) -> dict:
        sp = plan.stages[stage_key]
        return identity_config(to_dict(JOB_KINDS[sp.kind].build(sp.overrides)), parents=(JOB_KINDS[sp.kind].parent,))

    cells = {c.method: c for c in plan.cells}
    teacher = demo_jobs(tmp_path / "demo", progress=False)[0]
    assert identity(cells["zskt"].stages[0]) == identity_config(to_dict(teacher), parents=("teacher",))
    for method, extra in (("zskt", []), ("zskt_abd", DEMO_ABD), ("sv_only", [*DEMO_ABD, "abd.mode=sv"])):
        demo = demo_datafree_job(tmp_path / "demo", abd=False, progress=False, extra=[*extra, "seed=1"])
        assert identity(cells[method].stages[-1]) == identity_config(to_dict(demo), parents=("teacher",)), method
