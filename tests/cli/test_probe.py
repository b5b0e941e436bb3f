"""``kdguard probe ...``: the diagnostics on a 1-epoch BadNets LeNet-5 teacher (embedded MNIST) and a
few-round ZSKT run from it."""

from __future__ import annotations

import json

import pytest
from helpers import cli_error

from kdguard.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe")
    teacher, clean, zskt = base / "teacher", base / "clean", base / "zskt"
    common = ["data.name=mnist_embedded", "model=lenet5", "train.epochs=1", "train.batch_size=64", "train.progress=false"]
    assert main(["train-teacher", *common, "attack.name=badnets", f"out={teacher}"]) == 0
    assert main(["train-teacher", *common, "attack.name=null", f"out={clean}"]) == 0
    assert main(["distill-datafree", f"teacher={teacher}", "method=zskt", "preset=cpu", "student=lenet5",
                 "schedule.rounds=3", "schedule.batch_size=16", "schedule.student_steps=1", "generator.width=8",
                 "monitor.every=3", "monitor.grid_every=0", "progress=false", f"out={zskt}"]) == 0
    return teacher, clean, zskt


def test_sv_premise(runs, tmp_path, capsys):
    teacher, _, _ = runs
    out = tmp_path / "sv.json"
    assert main(["probe", "sv-premise", str(teacher), "--n", "200", "--shuffles", "2", "--layers", "1,2", "--out", str(out)]) == 0
    assert "| triggered |" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert [r["layers"] for r in results] == [1, 2] and results[0]["n"] == 200
    for r in results:
        rows = r["rows"]
        assert set(rows) == {"clean", "triggered"} and len(rows["clean"]["flagged"]) == 2
        assert all(0.0 <= v <= 1.0 for v in rows["triggered"]["flagged"] + rows["clean"]["shuffled_target_share"])


def test_synthetic_and_sr_perturbation(runs, tmp_path, capsys):
    _, _, zskt = runs
    out = tmp_path / "synthetic.json"
    assert main(["probe", "synthetic", str(zskt), "--n", "64", "--out", str(out)]) == 0
    (res,) = json.loads(out.read_text())
    assert set(res["rows"]) == {"synthetic", "generator at round 0", "real clean test", "uniform noise"}
    assert res["round"] == 3 and abs(res["chance"] - 0.1) < 1e-9
    assert 0.0 <= res["rows"]["synthetic"]["teacher_target_prob"] <= 1.0
    out = tmp_path / "sr.json"
    assert main(["probe", "sr-perturbation", str(zskt), "--batches", "2", "--batch", "16", "--inner-steps", "2",
                 "--n-real", "50", "--out", str(out)]) == 0
    (sr,) = json.loads(out.read_text())
    assert 0.0 <= sr["batches_to_target"] <= 1.0 and 0.0 < sr["trigger_pixels"] < 1.0 and sr["max_abs_delta"] > 0


def test_target_share(runs, tmp_path, capsys):
    teacher, clean, _ = runs
    out = tmp_path / "share.json"
    assert main(["probe", "target-share", str(teacher), str(clean), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["target"] for r in results] == [0, 0] and all(0.0 <= r["share"] <= 1.0 for r in results)


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    teacher, clean, zskt = runs
    assert "not a directory" in cli_error(["probe", "sv-premise", str(tmp_path / "none")], capsys)
    assert "no attack" in cli_error(["probe", "sv-premise", str(clean)], capsys)
    assert "datafree_state.pt" in cli_error(["probe", "synthetic", str(teacher)], capsys)
    assert "--n" in cli_error(["probe", "synthetic", str(zskt), "--n", "0"], capsys)
    assert "--layers" in cli_error(["probe", "sv-premise", str(teacher), "--layers", "1 2"], capsys)
    assert "--target" in cli_error(["probe", "target-share", str(teacher), "--target", "12"], capsys)
    assert "--offsets" in cli_error(["probe", "target-bias", str(teacher), "--offsets", "a,b"], capsys)
    assert "no attack" in cli_error(["probe", "target-bias", str(clean)], capsys)


def test_target_bias_matches_the_run_metrics_and_saturates(runs, tmp_path, capsys):
    _, _, zskt = runs
    out = tmp_path / "bias.json"
    assert main(["probe", "target-bias", str(zskt), "--offsets", "0,1000", "--out", str(out)]) == 0
    assert "| target-logit offset |" in capsys.readouterr().out
    (res,) = json.loads(out.read_text())
    plain, saturated = res["rows"]
    metrics = json.loads((zskt / "metrics.json").read_text())
    # offset 0 is the model as it is: the run's own last-round test metrics
    for key in ("ca", "target_ca", "asr", "asr_no_trigger"):
        assert plain[key] == pytest.approx(metrics[key]), key
    # a huge offset sends every image to the target
    assert saturated["target_ca"] == saturated["asr"] == saturated["asr_no_trigger"] == 1.0
    assert saturated["ca"] < 0.2
