"""Short CLI runs of `kdguard robustkd` and `kdguard robustkd-trigger` on the embedded MNIST digits
(a LeNet-5 teacher saved without training, 1 detox epoch, 1 distillation epoch)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kdguard.checkpoint import load_model, model_spec, read_manifest, save_model
from kdguard.cli import main
from kdguard.config import AttackConfig, DataConfig, TrainConfig, to_dict
from kdguard.defenses.robustkd import FeatureDetox
from kdguard.io import read_json
from kdguard.models import build_model
from kdguard.attacks import make_attack
from kdguard.data import load_splits
from kdguard.runs import evaluate_model

FAST = ["student=lenet5", "clean_fraction=0.05", "detox.epochs=1", "detox.batch_size=64", "train.epochs=1",
        "train.batch_size=64", "train.progress=false"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1, mean=(0.13,), std=(0.31,))
    attack = AttackConfig(name="badnets")
    save_model(out, model, {"role": "teacher", "dataset": {"name": "mnist_embedded"},
                            "model": model_spec(model, num_classes=10, in_channels=1, mean=(0.13,), std=(0.31,)),
                            "attack": {"config": to_dict(attack)}, "metrics": {"ca": 0.1, "asr": 0.0}})
    return out


@pytest.fixture(scope="module")
def robustkd_run(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("robustkd")
    assert main(["robustkd", "--teacher", str(teacher_dir), *FAST, f"out={out}"]) == 0
    return out


def test_robustkd_writes_a_complete_run(robustkd_run):
    for name in ("config.yaml", "detox.safetensors", "detox_masks.png", "detox_history.json", "detox_metrics.json",
                 "manifest.json", "model.safetensors", "metrics.json", "metrics.jsonl", "report.md", "curves.png"):
        assert (robustkd_run / name).exists(), name
    metrics = read_json(robustkd_run / "metrics.json")
    assert {"ca", "asr", "detox_seconds", "distill_seconds", "n_distill"} <= set(metrics)
    assert metrics["detox_seconds"] > 0 and metrics["distill_seconds"] > 0
    manifest = read_manifest(robustkd_run)
    assert manifest["method"] == "robustkd" and manifest["detox"]["paths"] == ["block1.conv", "block2.conv"]
    assert manifest["distiller"]["margin"] == "none"  # LeNet-5 has no BatchNorm
    assert "Detoxification" in (robustkd_run / "report.md").read_text()
    student, _ = load_model(robustkd_run)
    assert student.arch == "lenet5"


def test_saved_detox_reproduces_the_detoxified_teacher(robustkd_run, teacher_dir):
    teacher, manifest = load_model(teacher_dir)
    detox = FeatureDetox.load(robustkd_run)
    data = load_splits(DataConfig(name="mnist_embedded"), seed=0)
    attack = make_attack(AttackConfig(name="badnets"), data.test.shape, 10)
    with detox.attach(teacher):
        again = evaluate_model(teacher, data.test, attack, train_cfg=TrainConfig(progress=False)).to_dict()
    recorded = read_json(robustkd_run / "detox_metrics.json")["teacher_detox"]
    assert again["clean_correct"] == recorded["clean_correct"] and again["backdoor_hits"] == recorded["backdoor_hits"]


def test_rerun_reuses_the_detox_and_resumes(robustkd_run, teacher_dir):
    detox_bytes = (robustkd_run / "detox.safetensors").read_bytes()
    lines = (robustkd_run / "metrics.jsonl").read_text().count("\n")
    assert main(["robustkd", "--teacher", str(teacher_dir), *FAST, f"out={robustkd_run}"]) == 0
    assert (robustkd_run / "detox.safetensors").read_bytes() == detox_bytes
    assert (robustkd_run / "metrics.jsonl").read_text().count("\n") == lines


def test_detox_only_evaluates_the_detoxified_teacher_and_trains_no_student(robustkd_run, teacher_dir, tmp_path):
    out = tmp_path / "detox_only"
    assert main(["robustkd", "--teacher", str(teacher_dir), *FAST, "detox.only=true", f"out={out}"]) == 0
    metrics = read_json(out / "metrics.json")
    recorded = read_json(out / "detox_metrics.json")["teacher_detox"]
    assert metrics["ca"] == recorded["ca"] and metrics["asr"] == recorded["asr"]
    assert 0.0 <= metrics["fraction_masked"] <= 1.0 and metrics["detox_seconds"] > 0
    assert not (out / "model.safetensors").exists() and not (out / "manifest.json").exists()
    # same settings as the full run up to the detoxification: the same detoxified teacher
    assert read_json(robustkd_run / "detox_metrics.json")["teacher_detox"]["clean_correct"] == recorded["clean_correct"]


@pytest.mark.parametrize("against", ["detoxified", "teacher"])
def test_adversarial_detox_saves_its_perturbation(teacher_dir, tmp_path, against):
    out = tmp_path / "adv"
    assert main(["robustkd", "--teacher", str(teacher_dir), *FAST, "detox.adversarial_weight=1.0",
                 "detox.epsilon=0.1", f"detox.adversarial_against={against}", "detox.perturbation_epochs=1",
                 f"out={out}"]) == 0
    delta = load_file(str(out / "detox_perturbation.safetensors"))["delta"]
    assert delta.shape == (1, 1, 28, 28) and float(delta.abs().max()) <= 0.1 + 1e-6
    assert "adversarial" in read_json(out / "detox_history.json")[-1]
    search = out / "detox_perturbation_search.json"
    assert (len(read_json(search)) == 1) if against == "teacher" else not search.exists()


def test_trigger_command_and_registered_trigger(teacher_dir, tmp_path, capsys):
    out = tmp_path / "trigger"
    assert main(["robustkd-trigger", "--teacher", str(teacher_dir), "epochs=1", "fraction=0.02", "batch_size=32",
                 "top_fraction=0.2", "progress=false", f"out={out}"]) == 0
    for name in ("trigger.safetensors", "trigger.png", "trigger.json", "config.yaml"):
        assert (out / name).exists(), name
    info = read_json(out / "trigger.json")
    assert set(info["channels"]) == {"block1", "block2"} and info["mask_max"] <= 0.2
    capsys.readouterr()
    # the trigger is registered for every command once the CLI has loaded (evaluate with it)
    assert main(["evaluate", str(teacher_dir), "--json", "--attack", "robustkd_blend"]) == 0
    assert json.loads(capsys.readouterr().out)["n_backdoor"] == 900


def test_evaluate_a_clean_model_against_another_runs_attack(teacher_dir, tmp_path, capsys):
    clean = tmp_path / "clean"
    model, manifest = load_model(teacher_dir)
    save_model(clean, model, {**{k: v for k, v in manifest.items() if k != "attack"}, "role": "teacher"})
    capsys.readouterr()
    assert main(["evaluate", str(clean), "--json"]) == 0
    assert json.loads(capsys.readouterr().out).get("n_backdoor") in (None, 0)
    assert main(["evaluate", str(clean), "--json", "--attack-from", str(teacher_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["n_backdoor"] > 0  # the teacher's BadNets trigger
    assert main(["evaluate", str(clean), "--attack-from", str(clean)]) == 2
    assert "records no attack" in capsys.readouterr().err
    assert main(["evaluate", str(clean), "--attack", "blend", "--attack-from", str(teacher_dir)]) == 2
    assert "give only one" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["robustkd", "--teacher", "/nonexistent/teacher"], "does not exist"),
    (["robustkd", "--teacher", "T", "detox.form=magic"], "unknown detox objective form"),
    (["robustkd", "--teacher", "T", "detox.epsilon=0"], "epsilon=0"),
    (["robustkd", "--teacher", "T", "pair=paper_e"], "does not build"),
    (["robustkd", "--teacher", "T", "detox.epochs=abc"], "invalid configuration"),
    (["robustkd-trigger", "--teacher", "T", "top_fraction=0"], "top_fraction"),
    (["robustkd", "--teacher", "T", "detox.only=true", "detox.enabled=false"], "detox.enabled=false"),
])
def test_bad_input_is_one_error_line(args, fragment, teacher_dir, tmp_path, capsys):
    args = [str(teacher_dir) if a == "T" else a for a in args] + [f"out={tmp_path / 'x'}", "train.progress=false"
                                                                  if args[0] == "robustkd" else "progress=false"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and fragment in err, err
