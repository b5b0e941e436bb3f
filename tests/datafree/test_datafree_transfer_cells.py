"""Cell selection of benchmarks/datafree_transfer.py, which benchmarks/datafree_parallel.sh relies on."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import load_benchmark


@pytest.fixture(scope="module")
def transfer():
    return load_benchmark("datafree_transfer")


def _main(transfer, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["datafree_transfer.py", *argv])
    transfer.main()


def test_list_prints_every_cell_of_the_table(transfer, monkeypatch, capsys):
    _main(transfer, monkeypatch, "--table", "abd", "--list")
    cells = capsys.readouterr().out.split()
    expected = [f"{a}:{m}" for a, methods in transfer.PROTOCOLS["abd"].items() for m in methods]
    assert cells == expected
    assert "badnets:zskt+abd" in cells and "sig_abd:clean_kd" in cells


def test_unknown_cell_is_a_usage_error_naming_it(transfer, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _main(transfer, monkeypatch, "--smoke", "--out", str(tmp_path), "--only", "badnets:zkst")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "badnets:zkst" in err and "--list" in err
    assert not any(tmp_path.iterdir())  # nothing was trained


def test_report_before_any_run_lists_missing_cells(transfer, monkeypatch, capsys, tmp_path):
    _main(transfer, monkeypatch, "--smoke", "--out", str(tmp_path), "--report")
    assert "not run yet: badnets:zskt" in capsys.readouterr().out
    assert not (tmp_path / "smoke" / "teachers").exists()


def test_teacher_cell_trains_only_the_teacher(transfer, monkeypatch, capsys, tmp_path):
    _main(transfer, monkeypatch, "--smoke", "--out", str(tmp_path), "--only", "badnets:teacher")
    root = tmp_path / "smoke"
    assert (root / "teachers" / "badnets_s0" / "metrics.json").exists()
    assert not (root / "teachers" / "blend_s0").exists()
    assert not (root / "badnets").exists()  # no student cell ran
    assert "not run yet: badnets:zskt" in capsys.readouterr().out


def test_sr_cells_continue_a_shared_prefix(transfer, monkeypatch, capsys, tmp_path):
    """zskt and zskt+sr share the rounds before the SR phase: they run once, in a prefix run
    that both cells continue; an unfinished run of the base cell started earlier becomes it."""
    root = tmp_path / "smoke" / "trojan_3x3"
    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(tmp_path), "--only",
          "trojan_3x3:teacher")
    # an older, unfinished run of the base cell, stopped before the phase start (smoke: round 1 of 2)
    teacher = str(tmp_path / "smoke" / "teachers" / "trojan_3x3_s0")
    cfg = transfer.settings(transfer.argparse.Namespace(smoke=True))
    old = transfer.cell_dir(tmp_path / "smoke", "trojan_3x3", "zskt", 0)
    transfer.run_datafree(transfer.build_datafree_job(
        None, transfer.datafree_overrides("zskt", teacher, cfg, old, 0, False) + ["schedule.stop_after=1"]))
    first_record = (old / "metrics.jsonl").read_text().splitlines()[0]

    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(tmp_path), "--only",
          "trojan_3x3:zskt", "trojan_3x3:zskt+sr")
    prefix = root / "prefix_zskt_r1_s0"
    assert transfer.saved_round(prefix) == 1
    for cell in ("zskt_s0", "zskt_sr_s0"):
        assert (root / cell / "metrics.json").exists()
        # the prefix's record of round 1 is the older run's, kept rather than recomputed
        assert (root / cell / "metrics.jsonl").read_text().splitlines()[0] == first_record
    sr = json.loads((root / "zskt_sr_s0" / "metrics.json").read_text())
    assert sr["abd"]["mode"] == "sr" and sr["abd"]["sr"]["sr_steps"] > 0
    assert "abd" not in json.loads((root / "zskt_s0" / "metrics.json").read_text())
    out = capsys.readouterr().out
    assert "| Trojan 3×3 | zskt+sr |" in out


def test_cells_without_their_base_in_the_table_run_from_scratch(transfer):
    methods = transfer.PROTOCOLS["abd"]["blend"]  # zskt, zskt+abd, clean_kd: no zskt+sv
    assert transfer.shared_prefix("zskt+abd", methods) is None
    assert transfer.shared_prefix("zskt", methods) is None
    ablation = transfer.PROTOCOLS["abd"]["trojan_3x3"]
    assert transfer.shared_prefix("zskt+abd", ablation) == "zskt+sv"
    assert transfer.shared_prefix("zskt+sv", ablation) == "zskt+sv"
    assert transfer.shared_prefix("zskt+sr", ablation) == "zskt"
    assert transfer.shared_prefix("cmi+abd", ablation) is None


def _cell(attack, method, ca, asr, no_trigger=0.05, minutes=60.0, seed=0):
    return {"attack": attack, "method": method, "seed": seed,
            "student": {"ca": ca, "asr": asr, "asr_no_trigger": no_trigger, "train_seconds": 60 * minutes}}


def test_target_check_judges_only_transferring_pairs(transfer):
    cells = [
        _cell("trojan_3x3", "zskt", 0.50, 0.72, minutes=70), _cell("trojan_3x3", "zskt+abd", 0.48, 0.06),
        _cell("trojan_3x3", "zskt+sv", 0.49, 0.70, minutes=77.7),
        _cell("badnets", "zskt", 0.55, 0.61), _cell("badnets", "zskt+abd", 0.50, 0.12),
        _cell("trojan_wm", "zskt", 0.60, 0.20), _cell("trojan_wm", "zskt+abd", 0.40, 0.90),  # no transfer
        _cell("blend", "zskt", 0.10, 1.00, no_trigger=1.00),  # collapse, defended cell not run
        _cell("badnets", "clean_kd", 0.70, 0.02),
    ]
    rows = {(r["kind"], r["method"]): r for r in transfer.target_check(cells)}
    asr, drop = rows["mean_asr", "zskt+abd"], rows["ca_drop", "zskt+abd"]
    assert asr["pairs"] == drop["pairs"] == ["badnets:s0", "trojan_3x3:s0"]  # trojan_wm ≤ 50 %: not counted
    assert asr["value"] == pytest.approx(0.09) and asr["met"] is True
    assert drop["value"] == pytest.approx(0.035) and drop["met"] is False
    assert asr["pending"] == ["blend:s0"] and asr["collapsed"] == ["blend:s0"]
    # the SV-only cell is judged by the same bars on its own pairs; badnets has none yet
    sv_asr, sv_drop = rows["mean_asr", "zskt+sv"], rows["ca_drop", "zskt+sv"]
    assert sv_asr["pairs"] == ["trojan_3x3:s0"] and sv_asr["pending"] == ["badnets:s0", "blend:s0"]
    assert sv_asr["value"] == pytest.approx(0.70) and sv_asr["met"] is False
    assert sv_drop["value"] == pytest.approx(0.01) and sv_drop["met"] is True
    sv = rows["sv_overhead", "zskt+sv"]
    assert sv["pairs"] == ["trojan_3x3:s0"] and sv["value"] == pytest.approx(0.11) and sv["met"] is False
    assert ("mean_asr", "zskt+sr") not in rows  # no SR-only cell ran: no row for it
    assert {m for (_, m) in rows} == {"zskt+abd", "zskt+sv"}  # clean KD is no baseline


def test_target_check_is_undecided_until_a_defended_cell_finishes(transfer, capsys):
    rows = transfer.target_check([_cell("trojan_3x3", "zskt", 0.50, 0.72), _cell("blend", "zskt", 0.7, 0.3)])
    assert [r["met"] for r in rows] == [None, None]
    assert rows[0]["pending"] == ["trojan_3x3:s0"]
    transfer.print_targets(rows)
    out = capsys.readouterr().out
    assert "| — | < 10 % | — | trojan_3x3:s0 |" in out


def test_target_check_gives_means_without_the_collapsed_pairs(transfer, capsys):
    cells = [_cell("trojan_3x3", "zskt", 0.50, 0.72), _cell("trojan_3x3", "zskt+abd", 0.45, 0.06),
             _cell("blend", "zskt", 0.10, 1.00, no_trigger=1.00), _cell("blend", "zskt+abd", 0.40, 0.10)]
    rows = {r["kind"]: r for r in transfer.target_check(cells) if r["method"] == "zskt+abd"}
    asr, drop = rows["mean_asr"], rows["ca_drop"]
    assert asr["pairs"] == ["blend:s0", "trojan_3x3:s0"] and asr["collapsed"] == ["blend:s0"]
    assert asr["value"] == pytest.approx(0.08) and asr["value_without_collapsed"] == pytest.approx(0.06)
    # escaping the collapse gains 30 points and would hide the 5-point drop on Trojan 3×3
    assert drop["value"] == pytest.approx(-0.125) and drop["met"] is True
    assert drop["value_without_collapsed"] == pytest.approx(0.05)
    transfer.print_targets(list(rows.values()))
    assert "| blend:s0 | 5.0 points |" in capsys.readouterr().out


def test_sv_resume_cost_continues_a_run_with_and_without_the_vaccine(transfer, monkeypatch, capsys, tmp_path):
    """benchmarks/abd_sv_resume_cost.py on a smoke run stopped at round 1: each mode continues a
    copy for one round; SV's passes are timed and its flagged share reported, 'off' has none."""
    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(tmp_path), "--only",
          "trojan_3x3:teacher")
    teacher = str(tmp_path / "smoke" / "teachers" / "trojan_3x3_s0")
    cfg = transfer.settings(transfer.argparse.Namespace(smoke=True))
    run = tmp_path / "sv_run"
    partial = transfer.run_datafree(transfer.build_datafree_job(
        None, transfer.datafree_overrides("zskt+sv", teacher, cfg, run, 0, False) + ["schedule.stop_after=1"]))
    assert partial.metrics["finished"] is False and partial.metrics["abd"]["sv"]["flag_samples"] == 64  # 2 generator steps of 32

    bench = load_benchmark("abd_sv_resume_cost")
    out = tmp_path / "bench"
    monkeypatch.setattr(sys, "argv", ["abd_sv_resume_cost.py", "--run", str(run), "--rounds", "1",
                                      "--repeats", "1", "--warmup", "0", "--out", str(out)])
    bench.main()
    calls = {c["mode"]: c for c in json.loads((out / "abd_sv_resume_cost.json").read_text())["calls"]}
    assert sum(calls["sv"]["shuffled_pass_calls"].values()) >= 1 and calls["sv"]["flag_samples"] == 128
    assert calls["off"]["shuffled_pass_calls"] == {"no_grad": 0, "grad": 0} and calls["off"]["flag_samples"] is None
    assert transfer.saved_round(run) == 1  # the run itself is left as it was
    assert "sv vs off: median wall" in capsys.readouterr().out


def test_ledger_carries_cells_and_their_teacher_to_another_machine(transfer, monkeypatch, capsys, tmp_path):
    """A finished cell and its teacher are recorded in the ledger; a fresh run folder (another
    machine) reports the cell from it and restores the very same teacher weights."""
    ledger, here, there = tmp_path / "ledger", tmp_path / "here", tmp_path / "there"
    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(here), "--ledger", str(ledger),
          "--only", "trojan_3x3:clean_kd")
    record_file = ledger / "smoke" / "trojan_3x3" / "clean_kd_s0.json"
    record = json.loads(record_file.read_text())
    teacher_dir = here / "smoke" / "teachers" / "trojan_3x3_s0"
    sha = transfer.teacher_sha256(teacher_dir)
    assert record["teacher"]["sha256"] == sha and record["student"]["ca"] is not None
    assert record["recorded"]["machine"] and record["recorded"]["threads"] >= 1
    kept = ledger / "smoke" / "teachers" / "trojan_3x3_s0"
    assert (kept / "sha256.txt").read_text().strip() == sha
    assert not (kept / "train_state.pt").exists() and (kept / "metrics.json").exists()
    written = record_file.stat().st_ino
    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(here), "--ledger", str(ledger),
          "--report")
    assert record_file.stat().st_ino == written  # same numbers: the record is not rewritten
    capsys.readouterr()

    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(there), "--ledger", str(ledger),
          "--report")
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| Trojan 3×3 | clean_kd |"))
    assert row.endswith("| ledger |")
    assert transfer.teacher_sha256(there / "smoke" / "teachers" / "trojan_3x3_s0") == sha
    summary = json.loads((there / "smoke" / "summary_abd.json").read_text())
    assert [c["source"] for c in summary["cells"]] == ["ledger"]
    assert "trojan_3x3:zskt" in summary["missing"]
    assert record_file.read_text() == json.dumps(record, indent=2) + "\n"  # a report rewrites nothing


def test_ledger_cells_count_without_their_teacher(transfer, monkeypatch, capsys, tmp_path):
    """Cells transcribed from the docs after their runs were lost have no teacher in the ledger:
    they are reported, and a ledger whose weights do not match their digest is refused."""
    ledger = tmp_path / "ledger" / "smoke"
    cell = {**_cell("blend", "zskt", 0.5, 0.7), "teacher": {"ca": 0.9, "asr": 0.99, "sha256": None},
            "abd_reference": None, "provenance": "transcribed from docs/abd.md"}
    cell["student"]["peak_asr"] = None
    transfer.write_json(transfer.record_path(ledger, "blend", "zskt", 0), cell)
    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(tmp_path / "run"),
          "--ledger", str(tmp_path / "ledger"), "--report")
    out = capsys.readouterr().out
    assert "| Blend | zskt | 0 | 50.0 | 70.0 |" in out and "| ledger* |" in out
    assert "blend:zskt+abd" in out.split("not run yet:")[1]

    kept = ledger / "teachers" / "blend_s0"
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    (kept / "sha256.txt").write_text("0" * 64 + "\n")
    (kept / "metrics.json").write_text("{}")
    with pytest.raises(transfer.KDGuardError, match="do not match"):
        transfer.restore_teacher(ledger, tmp_path / "run" / "smoke" / "teachers" / "blend_s0")
    (kept / "sha256.txt").unlink()
    with pytest.raises(transfer.KDGuardError, match="do not match"):
        transfer.restore_teacher(ledger, tmp_path / "run" / "smoke" / "teachers" / "blend_s0")


def test_target_check_pairs_only_cells_of_the_same_teacher(transfer):
    def cell(method, ca, asr, sha):
        return {**_cell("trojan_3x3", method, ca, asr), "teacher": {"sha256": sha}}

    rows = {(r["kind"], r["method"]): r for r in transfer.target_check(
        [cell("zskt", 0.50, 0.72, None), cell("zskt+abd", 0.48, 0.05, "abc"), cell("zskt+sv", 0.5, 0.05, "abc")])}
    for method in ("zskt+abd", "zskt+sv"):
        assert rows["mean_asr", method]["met"] is None
        assert rows["mean_asr", method]["pending"] == ["trojan_3x3:s0 (other teacher)"]
    assert ("sv_overhead", "zskt+sv") not in rows


def test_sr_sweep_continues_given_prefix_runs_into_their_sr_phase(transfer, monkeypatch, capsys, tmp_path):
    """benchmarks/abd_sr_sweep.py --prefix: an SV prefix stopped at its SR phase start is
    continued, in a copy, with abd.mode=full (SV stays on) and the variant's overrides, to the
    run's last round; the prefix itself is left as it was; a folder that is no run is an error."""
    _main(transfer, monkeypatch, "--smoke", "--table", "abd", "--out", str(tmp_path), "--only",
          "trojan_3x3:teacher")
    teacher = str(tmp_path / "smoke" / "teachers" / "trojan_3x3_s0")
    cfg = transfer.settings(transfer.argparse.Namespace(smoke=True))
    prefix = tmp_path / "trojan_3x3" / "prefix_zskt_sv_r1_s0"
    transfer.run_datafree(transfer.build_datafree_job(
        None, transfer.datafree_overrides("zskt+sv", teacher, cfg, prefix, 0, False) + ["schedule.stop_after=1"]))

    sweep = load_benchmark("abd_sr_sweep")  # it imports its sibling seed_table
    assert sweep.prefix_mode(prefix) == "full"
    out = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["abd_sr_sweep.py", "--out", str(out), "--prefix", str(prefix),
                                      "--only", "weight 0"])
    sweep.main()
    (run_dir,) = (out / "trojan_3x3").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds"] == 2 and metrics["abd"]["mode"] == "full"
    assert metrics["abd"]["sv"]["status"] == "active" and metrics["abd"]["sr"]["sr_steps"] > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["abd"]["sr"]["weight"] == 0
    assert transfer.saved_round(prefix) == 1  # the prefix is untouched
    table = capsys.readouterr().out
    assert "per run" in table and "abd.sr.weight=0" in table and "(abd.mode=full)" in table

    with pytest.raises(transfer.KDGuardError, match="no datafree_state.pt"):
        sweep.prefix_mode(tmp_path / "sweep")


def test_layer_variants_parse_share_their_sv_prefix_and_set_the_layers(transfer):
    assert transfer.parse_defence("sv") == ("sv", None)
    assert transfer.parse_defence("abd_k2") == ("abd", 2)
    for bad in ("sr_k2", "sv_k0", "sv_kx", "svx"):
        with pytest.raises(ValueError, match="sv_k2"):
            transfer.parse_defence(bad)
    assert transfer.sr_prefix("zskt+abd_k2") == "zskt+sv_k2"
    assert transfer.sr_prefix("cmi+sr") == "cmi"
    assert transfer.sr_prefix("zskt+sv_k2") is None and transfer.sr_prefix("zskt") is None
    methods = transfer.PROTOCOLS["abd"]["blend_cartoon"]
    assert transfer.shared_prefix("zskt+abd_k2", methods) == "zskt+sv_k2"
    assert transfer.shared_prefix("zskt+sv_k2", methods) == "zskt+sv_k2"
    assert transfer.shared_prefix("zskt+abd", methods) is None  # its own SV prefix (5 layers) is not in the table
    cfg = {"student": "resnet8", "datafree": [], "root": None, "cmi_overrides": []}
    overrides = transfer.datafree_overrides("zskt+abd_k2", "t", cfg, Path("o"), 0, False)
    assert "abd.mode=full" in overrides and "abd.sv.layers=2" in overrides
    assert not any(o.startswith("abd.sv.layers") for o in transfer.datafree_overrides("zskt+sv", "t", cfg, Path("o"), 0, False))


def test_target_check_judges_the_layer_variants_after_the_issue_cells(transfer):
    assert transfer.defended_variants("zskt", ["zskt", "zskt+sv_k2", "zskt+sr", "cmi+sv"]) == \
        ["zskt+abd", "zskt+sr", "zskt+sv_k2"]
    cells = [_cell("blend_cartoon", "zskt", 0.50, 0.60), _cell("blend_cartoon", "zskt+abd", 0.44, 0.30),
             _cell("blend_cartoon", "zskt+sv_k2", 0.49, 0.05)]
    rows = {(r["method"], r["kind"]): r for r in transfer.target_check(cells)}
    assert rows[("zskt+sv_k2", "mean_asr")]["met"] is True
    assert rows[("zskt+sv_k2", "ca_drop")]["value"] == pytest.approx(0.01)
    assert rows[("zskt+abd", "mean_asr")]["met"] is False


def test_headline_table_has_a_column_per_method_means_and_marks_other_teachers(transfer):
    def cell(attack, method, ca, asr, sha="a", minutes=60.0):
        return {**_cell(attack, method, ca, asr, minutes=minutes), "teacher": {"sha256": sha}}
    cells = [cell("trojan_3x3", "zskt", 0.50, 0.72, minutes=30), cell("trojan_3x3", "zskt+abd", 0.45, 0.06),
             cell("trojan_3x3", "cmi", 0.70, 0.29, sha="b"),
             cell("badnets", "zskt", 0.54, 0.04, minutes=40), cell("badnets", "zskt+sv_k2", 0.4, 0.3)]
    lines = transfer.headline_table(cells, transfer.HEADLINE_METHODS).splitlines()
    # no cell ran zskt+sv, zskt+sr, clean_kd or cmi+abd: no column; zskt+sv_k2 is not a headline column
    assert lines[0] == "| attack | seed | zskt CA / ASR % | zskt+abd CA / ASR % | cmi CA / ASR % |"
    assert lines[2] == "| Trojan 3×3 | 0 | 50.0 / 72.0 | 45.0 / 6.0 | 70.0 / 29.0 † |"
    assert lines[3] == "| BadNets grid 3×3 | 0 | 54.0 / 4.0 | — | — |"
    assert lines[4] == "| mean (cells) | | 52.0 / 38.0 (2) | 45.0 / 6.0 (1) | 70.0 / 29.0 (1) |"
    assert lines[5] == "| mean train minutes | | 35.0 | 60.0 | 60.0 |"
    # without a column list every method that ran gets one, in order of appearance
    assert transfer.headline_table(cells).splitlines()[0].endswith("| cmi CA / ASR % | zskt+sv_k2 CA / ASR % |")
