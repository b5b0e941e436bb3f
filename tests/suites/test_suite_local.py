"""The tiny suite under the local engine: stage counts (a shared teacher trained once), reuse on
a second run, the ledger's teacher restore and digest checks, status and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import cli_error

from kdguard.cli import main
from kdguard.suites import load_suite, plan_suite, run_suite, suite_status


def test_every_cell_is_recorded_and_the_teacher_is_shared(tiny_local, records):
    runs, ledger, result = tiny_local
    recs = records(ledger)
    assert sorted(recs) == [(c, s) for c in ("badnets/kd", "badnets/zskt", "blend/kd", "blend/zskt") for s in (0, 1)]
    # 2 triggers × 2 seeds teachers + 8 students ran; each teacher served a second method
    assert (result.ran, result.reused) == (12, 4)
    assert len(list((runs / "stages").glob("teacher-*"))) == 4
    r = recs[("badnets/zskt", 0)]
    assert r["teacher"]["stage"] == "teacher" and len(r["teacher"]["sha256"]) == 64
    assert recs[("badnets/kd", 0)]["teacher"]["sha256"] == r["teacher"]["sha256"]  # one teacher, two methods
    assert recs[("badnets/kd", 1)]["teacher"]["sha256"] != r["teacher"]["sha256"]  # a teacher per seed
    assert {"ca", "asr", "asr_no_trigger"} <= set(r["metrics"]) and r["curve"]
    assert r["fingerprint"] == r["stages"][-1]["fingerprint"] and r["seed"] == 0
    full = json.loads((ledger / "tiny" / "cpu" / "badnets" / "zskt" / "s0.json").read_text())
    assert full["threads"] == 1 and full["device"] == "cpu" and full["versions"]["torch"]
    assert full["wall_seconds"] > 0 and full["machine"]


def test_a_second_run_reuses_every_stage(tiny_local):
    runs, ledger, _ = tiny_local
    before = {p: p.stat().st_mtime_ns for p in (ledger / "tiny").rglob("*.json")}
    result = run_suite(plan_suite(load_suite("tiny"), out=runs), ledger=ledger)
    assert (result.ran, result.reused) == (0, 16)
    assert {p: p.stat().st_mtime_ns for p in (ledger / "tiny").rglob("*.json")} == before  # nothing rewritten
    rows = suite_status(plan_suite(load_suite("tiny"), out=runs), ledger)
    assert all(r["recorded"] and set(r["stages"].values()) == {"done"} for r in rows)


def test_ledger_teacher_is_restored_and_checked(tiny_local, tmp_path, capsys, records):
    _, ledger, _ = tiny_local
    mine = tmp_path / "results"
    shutil.copytree(ledger, mine)
    plan = plan_suite(load_suite("tiny"), out=tmp_path / "runs", seeds=[0], only="badnets/kd")
    result = run_suite(plan, ledger=mine)
    assert result.restored == 1 and result.ran == 1  # the teacher came from the ledger, the student ran
    assert records(mine)[("badnets/kd", 0)] == records(ledger)[("badnets/kd", 0)]
    # a ledger teacher whose weights do not match its digest is refused
    stored = next((mine / "tiny" / "teachers").glob("teacher-*"))
    (stored / "sha256.txt").write_text("0" * 64 + "  model.safetensors\n")
    args = ["suite", "run", "tiny", "--out", str(tmp_path / "runs2"), "--ledger", str(mine), "--seeds", "0,1"]
    err = cli_error(args, capsys)
    assert "sha256" in err and "ledger teacher" in err


def test_report_tables_and_page(tiny_local, tmp_path, capsys):
    _, ledger, _ = tiny_local
    mine = tmp_path / "results"
    shutil.copytree(ledger, mine)
    # a record claiming another teacher is refused by the report
    path = mine / "tiny" / "cpu" / "blend" / "kd" / "s1.json"
    r = json.loads(path.read_text())
    r["teacher"]["sha256"] = "f" * 64
    path.write_text(json.dumps(r))
    assert main(["suite", "report", "tiny", "--ledger", str(mine), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "tiny.md").read_text()
    page = (tmp_path / "rep" / "tiny.html").read_text()
    assert "| badnets/kd | 0,1 |" in md and " ± " in md and "(2)" in md
    assert "worst seed" in md and "no-trigger %" in md
    assert "| blend/kd | 0 |" in md  # its seed 1 was refused
    assert "Refused records" in md and "differs from the ledger's teacher" in md
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") >= 6
    assert "<table>" in page and "http" not in page.split("<body>")[1]  # offline: nothing fetched


def test_list_and_status_commands(tiny_local, capsys):
    runs, ledger, _ = tiny_local
    assert main(["suite", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "abd" in out
    assert main(["suite", "status", "tiny", "--out", str(runs), "--ledger", str(ledger)]) == 0
    out = capsys.readouterr().out
    assert "8/8 cell runs recorded" in out and "badnets/zskt" in out
    assert main(["suite", "status", "tiny", "--only", "badnets/zskt", "--seeds", "0", "--out", str(runs),
                 "--ledger", str(ledger), "--dirs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    zskt_dir = next(line.split()[1] for line in lines if line.strip().startswith("zskt "))
    assert (Path(zskt_dir) / "datafree_state.pt").exists() or (Path(zskt_dir) / "metrics.json").exists()


def test_seeds_sentence_summarises_cells_over_the_recorded_seeds(tiny_local, tmp_path):
    import json
    import statistics

    from kdguard.suites.report import seeds_sentence

    _, ledger, _ = tiny_local
    text = seeds_sentence(ledger, "tiny", {"badnets/kd": "KD", "blend/zskt": "ZSKT"})
    kd = [json.loads((ledger / "tiny" / "cpu" / "badnets" / "kd" / f"s{s}.json").read_text())["metrics"]
          for s in (0, 1)]
    ca = [100 * m["ca"] for m in kd]
    assert text.startswith("Over seeds 0, 1 of this setting")
    assert f"KD: CA {statistics.mean(ca):.1f} ± {statistics.stdev(ca):.1f} (2) %" in text
    assert "ZSKT: CA" in text and "worst seed" in text and "target-class CA" in text
    assert "records them" in seeds_sentence(tmp_path / "empty", "tiny", {"badnets/kd": "KD"})


def test_rescore_adds_a_metric_a_record_lacks_and_checks_the_counts(tiny_local, tmp_path, capsys):
    runs, ledger, _ = tiny_local
    mine_runs, mine = tmp_path / "runs", tmp_path / "results"
    shutil.copytree(runs, mine_runs)
    shutil.copytree(ledger, mine)
    plan = plan_suite(load_suite("tiny"), out=mine_runs, seeds=[0])
    leaf = {c.cell: plan.stage_dir(c.stages[-1]) for c in plan.cells}
    added = ("target_ca", "n_target", "target_correct")
    original = json.loads((leaf["badnets/zskt"] / "metrics.json").read_text())
    for cell in ("badnets/zskt", "blend/kd"):  # as if recorded before the metric existed
        path = leaf[cell] / "metrics.json"
        metrics = {k: v for k, v in json.loads(path.read_text()).items() if k not in added}
        if cell == "blend/kd":
            metrics["clean_correct"] += 1  # a run whose stored counts do not reproduce
        path.write_text(json.dumps(metrics))
    record_file = mine / "tiny" / "cpu" / "badnets" / "zskt" / "s0.json"
    record = json.loads(record_file.read_text())
    record["metrics"] = {k: v for k, v in record["metrics"].items() if k not in added}
    record_file.write_text(json.dumps(record))
    args = ["suite", "rescore", "tiny", "--seeds", "0", "--out", str(mine_runs), "--ledger", str(mine)]
    assert main([*args, "--only", "badnets/zskt"]) == 0
    assert "added target_ca, n_target, target_correct" in capsys.readouterr().out
    again = json.loads((leaf["badnets/zskt"] / "metrics.json").read_text())
    assert {k: again[k] for k in added} == {k: original[k] for k in added}
    assert json.loads(record_file.read_text())["metrics"]["target_ca"] == original["target_ca"]
    assert main([*args, "--only", "badnets/zskt"]) == 0 and "complete" in capsys.readouterr().out
    err = cli_error([*args, "--only", "blend/kd"], capsys)
    assert "clean_correct" in err and "differs from the recorded" in err
    assert "target_ca" not in json.loads((leaf["blend/kd"] / "metrics.json").read_text())
