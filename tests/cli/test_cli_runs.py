"""End-to-end CLI runs on the embedded MNIST digits (1 epoch, seconds) and every bad-input case."""

from __future__ import annotations

import json

import pytest
from helpers import CLI_FAST, cli_error

from kdguard.checkpoint import read_manifest
from kdguard.cli import main
from kdguard.io import read_json, write_json

# teacher_dir (a 1-epoch BadNets LeNet-5, shared by the CLI tests) comes from conftest.py


def test_train_teacher_writes_a_complete_run(teacher_dir):
    for name in ("config.yaml", "manifest.json", "model.safetensors", "train_state.pt", "metrics.jsonl",
                 "metrics.json", "poison_indices.json", "report.md", "trigger_preview.png", "curves.png"):
        assert (teacher_dir / name).exists(), name
    metrics = read_json(teacher_dir / "metrics.json")
    assert {"ca", "asr", "asr_all", "ra", "n_clean", "n_backdoor"} <= set(metrics)
    assert metrics["train_seconds"] > 0
    assert metrics["n_clean"] == 1000 and metrics["n_backdoor"] == 1000 - 100  # 100 test images of class 0
    manifest = read_manifest(teacher_dir)
    assert manifest["model"]["arch"] == "lenet5" and manifest["attack"]["target"] == 0
    assert manifest["torch"] and "git_commit" in manifest
    indices = read_json(teacher_dir / "poison_indices.json")
    assert len(indices["poison_indices"]) == round(0.1 * 3800) and indices["seed"] == 0


def test_rerun_resumes_instead_of_retraining(teacher_dir, capsys):
    before = (teacher_dir / "metrics.jsonl").read_text().count("\n")
    # the fixture's own command (conftest.py): the same settings continue the same run
    assert main(["train-teacher", *CLI_FAST, "model=lenet5", "attack.name=badnets", "attack.poison_rate=0.1",
                 f"out={teacher_dir}"]) == 0
    # The finished epoch is not trained again: no new history line.
    assert (teacher_dir / "metrics.jsonl").read_text().count("\n") == before


def test_distill_then_evaluate_json(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", f"--teacher={teacher_dir}", *CLI_FAST, "student=lenet5", "clean_fraction=0.2",
                 f"out={out}"]) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["n_distill"] == round(0.2 * 4000)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ca"] == pytest.approx(metrics["ca"]) and printed["asr"] == pytest.approx(metrics["asr"])
    # Another attack than the teacher's: evaluate against a blended trigger.
    assert main(["evaluate", str(out), "--json", "--attack", "blend", "--target", "3"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["n_backdoor"] == 1000 - 100


def test_list_names_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist_embedded", "cifar10", "gtsrb", "badnets", "wanet", "resnet20", "wrn16_2", "lenet5", "kd",
                 "zskt", "cmi", "nad"):
        assert name in out


@pytest.mark.parametrize("args, fragment", [
    (["data.name=imagenet"], "unknown dataset 'imagenet'"),
    (["model=resnet21"], "unknown model 'resnet21'"),
    (["attack.name=badnetz"], "unknown attack 'badnetz'"),
    (["data.name=cifar10", "data.root=/nonexistent/data"], "/nonexistent/data"),
    (["attack.params.size=40"], "larger than the 28×28 image"),
    (["attack.poison_rate=1.5"], "poison rate"),
    (["attack.poison_rate=0"], "poison rate"),
    (["attack.target=10"], "target class 10"),
    (["model=nonexistent_pkg.models:factory"], "nonexistent_pkg"),
    (["train.epochs=many"], "could not be converted"),
])
def test_train_teacher_bad_input(args, fragment, tmp_path, capsys):
    err = cli_error(["train-teacher", *CLI_FAST, f"out={tmp_path / 'run'}", *args], capsys)
    assert fragment in err


def test_checkpoint_that_does_not_match_its_architecture(teacher_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((teacher_dir / "model.safetensors").read_bytes())
    manifest = read_manifest(teacher_dir)
    manifest["model"]["arch"] = "resnet8"
    write_json(bad / "manifest.json", manifest)
    err = cli_error(["evaluate", str(bad)], capsys)
    assert "does not match architecture 'resnet8'" in err


def test_missing_checkpoint_and_missing_teacher(tmp_path, capsys):
    assert "does not exist" in cli_error(["evaluate", str(tmp_path / "nope")], capsys)
    assert "teacher" in cli_error(["distill", *CLI_FAST], capsys)


def test_usage_errors_exit_2(capsys):
    capsys.readouterr()
    assert main(["no-such-command"]) == 2


def test_resumed_distill_reports_training_time_of_every_call(teacher_dir, tmp_path):
    # `seconds` is the last call's wall time; `train_seconds` must add the epochs of earlier calls,
    # or a run built in parts reports only its last part.
    out = tmp_path / "student"
    args = ["distill", f"--teacher={teacher_dir}", *CLI_FAST, "student=lenet5", "clean_fraction=0.2", f"out={out}"]
    assert main(args) == 0
    first = read_json(out / "metrics.json")
    assert first["train_seconds"] > 0
    (out / "metrics.json").unlink()
    assert main([*args, "train.epochs=2", "--resume"]) == 0  # resumes: epoch 2 only
    second = read_json(out / "metrics.json")
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert second["train_seconds"] == pytest.approx(sum(e["seconds"] for e in epochs))
    assert second["train_seconds"] > epochs[1]["seconds"]
