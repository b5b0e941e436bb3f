"""`kdguard defend` end to end on a 1-epoch LeNet-5 teacher (embedded MNIST), plus its bad inputs."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import cli_error

from kdguard.checkpoint import load_model, read_manifest
from kdguard.cli import main
from kdguard.defenses import ChannelPruner
from kdguard.io import read_json

FAST = ["train.epochs=1", "train.batch_size=128", "train.progress=false", "data.augment=false"]
DEFEND = ["train.epochs=1", "train.batch_size=32", "train.progress=false", "nad.teacher_epochs=1",
          "fineprune.step_ratio=0.25", "fineprune.ca_tolerance=1.0"]  # 4 channels a step: 3 steps
METRIC_KEYS = {"ca", "asr", "asr_all", "ra", "n_clean", "n_backdoor", "seconds", "n_defense", "method"}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("poisoned")
    assert main(["train-teacher", *FAST, "model=lenet5", "attack.name=badnets", f"out={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def defended(teacher_dir, tmp_path_factory):
    """Run every registered defence once; returns {method: run dir} and the teacher's weight hash before."""
    before = _sha(teacher_dir / "model.safetensors")
    runs = {}
    for method in ("ft", "fp", "nad"):
        out = tmp_path_factory.mktemp(method)
        assert main(["defend", "--model", str(teacher_dir), f"method={method}", *DEFEND, f"out={out}"]) == 0
        runs[method] = out
    return runs, before


@pytest.mark.parametrize("method", ["ft", "fp", "nad"])
def test_each_defence_writes_a_complete_run(defended, teacher_dir, method):
    runs, before = defended
    out = runs[method]
    for name in ("config.yaml", "manifest.json", "model.safetensors", "train_state.pt", "metrics.jsonl",
                 "metrics.json", "report.md"):
        assert (out / name).exists(), name
    metrics = read_json(out / "metrics.json")
    assert METRIC_KEYS <= set(metrics) and metrics["method"] == method
    assert metrics["n_defense"] == round(0.05 * 4000) and metrics["n_backdoor"] == 900
    manifest = read_manifest(out)
    assert manifest["role"] == "defense" and manifest["poisoned_model"] == str(teacher_dir)
    assert manifest["defense"]["name"] == method and manifest["defense"]["labels"] is True
    assert manifest["attack"]["target"] == 0 and manifest["dataset"]["name"] == "mnist_embedded"
    report = (out / "report.md").read_text()
    assert "| poisoned | lenet5 |" in report and f"| defended ({method}) | lenet5 |" in report
    # The poisoned run is only read; the defended weights differ from it.
    assert _sha(teacher_dir / "model.safetensors") == before
    poisoned, _ = load_model(teacher_dir)
    model, _ = load_model(out)
    assert any(not torch.equal(a, b) for a, b in zip(poisoned.state_dict().values(), model.state_dict().values()))


def test_fine_pruned_channels_stay_zero_after_fine_tuning_and_reload(defended):
    out = defended[0]["fp"]
    record = read_json(out / "prune.json")
    assert record["layer"] == "block2" and record["consumer"] == "fc1" and record["num_channels"] == 16
    pruned = record["pruned"]
    assert len(pruned) == record["num_pruned"] == 12  # k = 4, 8, 12 (never all 16) within tolerance 1
    # The pruned channels are the least active on the clean subset, in increasing order.
    acts = torch.tensor(record["activations"])
    assert pruned == torch.argsort(acts, stable=True)[:len(pruned)].tolist()
    model, manifest = load_model(out)
    assert manifest["fineprune"]["pruned"] == pruned
    cols = model.fc1.weight.view(120, 16, 25)
    assert cols[:, pruned].abs().max() == 0
    kept = [c for c in range(16) if c not in pruned]
    assert (cols[:, kept].abs().sum(dim=(0, 2)) > 0).all()
    x = torch.rand(2, 1, 28, 28)
    pruner = ChannelPruner(model, "block2", x)
    pruner.prune(pruned)  # weights unchanged: they are zero already
    assert torch.equal(model.fc1.weight, load_model(out)[0].fc1.weight)
    pruner.check_unused(x)
    assert [c["k"] for c in record["curve"]] == [0, 4, 8, 12]


def test_nad_trains_its_teacher_first_and_logs_ce_and_at(defended, teacher_dir):
    out = defended[0]["nad"]
    nad_teacher, t_manifest = load_model(out / "nad_teacher")
    poisoned, _ = load_model(teacher_dir)
    assert t_manifest["role"] == "nad_teacher"
    assert not torch.equal(nad_teacher.fc.weight, poisoned.fc.weight)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert any('"nad-student"' in ln and '"at"' in ln and '"ce"' in ln for ln in lines)
    assert read_manifest(out)["nad"]["betas"] == [500.0, 1000.0]  # LeNet-5 has two stages


def test_rerun_resumes_instead_of_retraining(defended, teacher_dir):
    out = defended[0]["ft"]
    before = (out / "metrics.jsonl").read_text().count("\n")
    assert main(["defend", "--model", str(teacher_dir), "method=ft", *DEFEND, f"out={out}"]) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == before


@pytest.mark.parametrize("extra, fragment", [
    (["method=nadd"], "unknown defense 'nadd'"),
    (["clean_fraction=0"], "clean fraction 0"),
    (["clean_fraction=1.5"], "clean fraction 1.5"),
    (["method=fp", "fineprune.select_on=test"], "fineprune.select_on 'test'"),
    (["train.epochs=abc"], "invalid configuration"),
])
def test_bad_inputs_exit_2_with_one_line(teacher_dir, tmp_path, capsys, extra, fragment):
    err = cli_error(["defend", "--model", str(teacher_dir), *extra, f"out={tmp_path / 'x'}"], capsys)
    assert fragment in err
    assert not (tmp_path / "x").exists()  # nothing is written for a rejected job


def test_model_dir_problems_exit_2(teacher_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((teacher_dir / "model.safetensors").read_bytes())
    assert "has no manifest.json" in cli_error(["defend", "--model", str(bare), f"out={tmp_path / 'o'}"], capsys)
    assert "model.safetensors" in cli_error(["defend", "--model", str(tmp_path), f"out={tmp_path / 'o'}"], capsys)
    assert "required setting 'model'" in cli_error(["defend", f"out={tmp_path / 'o'}"], capsys)
    assert "own directory" in cli_error(["defend", "--model", str(teacher_dir), f"out={teacher_dir}"], capsys)
