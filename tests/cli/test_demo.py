"""The main job, shrunk: teacher → clean KD, ZSKT and ZSKT + ABD students, one table."""

from __future__ import annotations

import json

from rich.console import Console

from kdguard.jobs.demo import DEMO_ABD, abd_verdict, demo_datafree_job, run_demo


def test_demo_runs_all_four_models_and_writes_one_report(tmp_path):
    console = Console(record=True, width=140)
    results = run_demo(tmp_path / "demo", console=console, rounds=2, epochs=1, student_epochs=1,
                       progress=False, seed_spread="Over seeds 0, 1 of this setting: (a sentence)")
    assert list(results) == ["teacher (BadNets 10 %)", "student: KD on 20 % clean data",
                             "student: ZSKT, data-free", "student: ZSKT + ABD"]
    printed = console.export_text()
    for role in results:
        assert role in printed
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert all({"ca", "asr", "asr_all", "ra"} <= set(m) for m in summary.values())
    abd = summary["student: ZSKT + ABD"]["abd"]
    assert abd["mode"] == "full" and abd["sr"]["sr_steps"] > 0
    assert "abd" not in summary["student: ZSKT, data-free"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "ZSKT + ABD" in report and "zskt_abd/datafree_curves.png" in report
    assert abd_verdict(summary["student: ZSKT, data-free"], summary["student: ZSKT + ABD"]) in report
    assert (tmp_path / "demo" / "zskt_abd" / "model.safetensors").exists()
    assert "Over seeds 0, 1 of this setting" in printed and "Over seeds 0, 1 of this setting" in report


def test_demo_abd_job_differs_from_the_plain_one_only_by_abd(tmp_path):
    plain = demo_datafree_job(tmp_path, abd=False)
    defended = demo_datafree_job(tmp_path, abd=True)
    assert plain.abd.mode == "off" and defended.abd.mode == "full"
    assert DEMO_ABD[0] == "abd.mode=full"
    plain.abd, plain.out = defended.abd, defended.out
    assert plain == defended


def test_abd_verdict_states_the_measured_numbers_and_the_sign_of_the_ca_change():
    text = abd_verdict({"ca": 0.92, "asr": 0.99}, {"ca": 0.75, "asr": 0.024})
    assert "99.0 % ASR" in text and "ASR was 2.4 %" in text and "CA 75.0 %" in text and "−17.0 points" in text
    assert "+1.0 points" in abd_verdict({"ca": 0.80, "asr": 0.5}, {"ca": 0.81, "asr": 0.1})
