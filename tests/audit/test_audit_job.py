"""`kdguard audit` end to end on a 1-epoch LeNet-5 teacher (embedded MNIST), the reconstructed
trigger handed to `evaluate --from-audit` and `defend method=unlearn --from-audit`, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CLI_FAST, cli_error
from safetensors.torch import load_file

from kdguard.audit.core import AuditSettings, audit_model
from kdguard.cli import main
from kdguard.errors import KDGuardError
from kdguard.io import read_json

AUDIT = ["audit.epochs=2", "audit.max_images=120", "audit.shuffle_rounds=1", "audit.smooth=true"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", *CLI_FAST, "model=lenet5", "attack.name=badnets", "attack.target=2",
                 f"out={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def audit_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    assert main(["audit", "--teacher", str(teacher_dir), *AUDIT, f"out={out}", "--overwrite"]) == 0
    return out


def test_audit_writes_a_complete_run(audit_dir, teacher_dir):
    for name in ("audit.json", "metrics.json", "report.md", "report.html", "triggers.safetensors",
                 "pictures/indices.png", "config.yaml", "run.json"):
        assert (audit_dir / name).is_file(), name
    assert not (audit_dir / "model.safetensors").exists()  # an audit holds no weights
    rec = read_json(audit_dir / "audit.json")
    assert rec["verdict"] in ("clean", "suspicious", "backdoored")
    assert rec["dataset"] == "mnist_embedded" and rec["teacher"]["arch"] == "lenet5"
    assert len(rec["teacher"]["sha256"]) == 64
    assert len(rec["classes"]) == 10 and [c["class"] for c in rec["classes"]] == list(range(10))
    assert rec["n_images"] == 120 // 10 * 10 or abs(rec["n_images"] - 120) <= 10
    for c in rec["classes"]:
        assert c["mask_l1"] >= 0 and 0 <= c["mask_success"] <= 1 and set(c["index"]) == {"mask", "additive", "smooth", "shuffle"}
        assert 0 < c["additive_eps"] <= 0.25 and 0 < c["smooth_eps"] <= 0.25 and -1 <= c["shuffle_lift"] <= 1
    assert rec["seconds"]["total"] >= rec["seconds"]["mask"] > 0
    metrics = read_json(audit_dir / "metrics.json")
    assert metrics["verdict"] == rec["verdict"] and metrics["suspected_targets"] == rec["suspected_targets"]
    tensors = load_file(str(audit_dir / "triggers.safetensors"))
    assert tensors["mask_0"].shape == (1, 28, 28) and tensors["pattern_9"].shape == (1, 28, 28)
    assert tensors["delta_3"].abs().max() <= 0.25 + 1e-6
    assert tensors["smooth_3"].shape == (1, 28, 28) and tensors["smooth_3"].abs().max() <= 0.25 + 1e-6
    for k in range(10):
        mask = np.load(audit_dir / "triggers" / f"class_{k}_mask.npy", allow_pickle=False)
        pattern = np.load(audit_dir / "triggers" / f"class_{k}_pattern.npy", allow_pickle=False)
        assert mask.shape == (28, 28) and pattern.shape == (28, 28, 1)
        assert np.allclose(mask, tensors[f"mask_{k}"][0].numpy())
    for k in rec["pictured_classes"]:
        assert (audit_dir / "pictures" / f"class_{k}.png").is_file()
    report = (audit_dir / "report.md").read_text()
    assert f"**Verdict: {rec['verdict']}**" in report and "| class | mask" in report and "smooth ε" in report
    html = (audit_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")


def test_evaluate_from_audit_measures_the_reconstructed_trigger(audit_dir, teacher_dir, capsys):
    rec = read_json(audit_dir / "audit.json")
    best = max(rec["classes"], key=lambda c: c["mask_success"])  # the trigger that reached its class best
    assert best["mask_success"] >= 0.9
    k = best["class"]
    capsys.readouterr()
    assert main(["evaluate", str(teacher_dir), "--from-audit", str(audit_dir), "--audit-class", str(k),
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # held out of the search it reached k; on the test split it sends most other images there too
    assert metrics["asr"] is not None and metrics["asr"] > 0.5, metrics


def test_unlearning_the_reconstructed_trigger_runs(audit_dir, teacher_dir, tmp_path):
    out = tmp_path / "unlearn"
    assert main(["defend", "--model", str(teacher_dir), "method=unlearn", "--from-audit", str(audit_dir),
                 "--audit-class", "2", "train.epochs=1", "train.batch_size=32", "train.progress=false",
                 f"out={out}"]) == 0
    metrics = read_json(out / "metrics.json")
    assert metrics["method"] == "unlearn" and metrics["n_defense"] == 200
    manifest = read_json(out / "manifest.json")
    assert manifest["unlearned_trigger"] == {"name": "patch", "target": 2, "stamped": 40}
    assert manifest["attack"]["config"]["name"] == "badnets"  # evaluated against the teacher's real trigger


def test_same_settings_give_the_same_audit(teacher_dir, audit_dir, tmp_path):
    out = tmp_path / "again"
    assert main(["audit", "--teacher", str(teacher_dir), *AUDIT, f"out={out}"]) == 0
    a, b = read_json(audit_dir / "audit.json"), read_json(out / "audit.json")
    assert a["classes"] == b["classes"] and a["verdict"] == b["verdict"]


@pytest.mark.parametrize("args, expected", [
    (["clean_fraction=0"], "clean fraction"),
    (["audit.votes=5"], "votes"),
    (["audit.eps_max=2"], "eps_max"),
    (["audit.shuffle_layers=0"], "layers"),
    (["audit.smooth_grid=1"], "grid 1 must be 0"),
])
def test_bad_settings_are_one_line(teacher_dir, tmp_path, capsys, args, expected):
    err = cli_error(["audit", "--teacher", str(teacher_dir), *AUDIT, *args, f"out={tmp_path / 'a'}"], capsys)
    assert expected in err
    assert not (tmp_path / "a").exists()  # refused before a run directory is made


def test_bare_weights_need_a_dataset(teacher_dir, tmp_path, capsys):
    bare = tmp_path / "bare.safetensors"  # away from the run directory's manifest
    bare.write_bytes((teacher_dir / "model.safetensors").read_bytes())
    err = cli_error(["audit", "--teacher", str(bare), "--teacher-arch", "lenet5",
                     "--num-classes", "10", "--in-channels", "1", f"out={tmp_path / 'a'}"], capsys)
    assert "names no dataset" in err and "data.name=" in err


def test_from_audit_bad_inputs(teacher_dir, audit_dir, tmp_path, capsys):
    assert "audit.json" in cli_error(["evaluate", str(teacher_dir), "--from-audit", str(teacher_dir)], capsys) \
        or "cannot read the audit" in cli_error(["evaluate", str(teacher_dir), "--from-audit", str(teacher_dir)], capsys)
    assert "--from-audit" in cli_error(["evaluate", str(teacher_dir), "--audit-class", "1"], capsys)
    assert "outside the audit" in cli_error(["evaluate", str(teacher_dir), "--from-audit", str(audit_dir),
                                             "--audit-class", "10"], capsys)
    assert "method=unlearn" in cli_error(["defend", "--model", str(teacher_dir), "method=ft", "--from-audit",
                                          str(audit_dir), f"out={tmp_path / 'd'}"], capsys)
    assert "--from-audit" in cli_error(["defend", "--model", str(teacher_dir), "method=unlearn",
                                        f"out={tmp_path / 'e'}"], capsys)


def test_one_class_or_no_images_is_refused(tiny_net):
    x = torch.rand(20, 1, 12, 12)
    with pytest.raises(KDGuardError, match="one class"):
        audit_model(tiny_net, x, torch.zeros(20, dtype=torch.long), settings=AuditSettings(shuffle=None))
    with pytest.raises(KDGuardError, match="non-empty"):
        audit_model(tiny_net, x[:0], torch.zeros(0, dtype=torch.long))


def test_summary_compares_with_the_recorded_attack(audit_dir, capsys):
    rec = read_json(audit_dir / "audit.json")
    assert rec["teacher"]["recorded_attack"] == {"name": "badnets", "target": 2, "label_mode": "all_to_one"}
    capsys.readouterr()
    assert main(["audit-summary", str(audit_dir), str(audit_dir)]) == 0
    out = capsys.readouterr().out
    assert "| mnist_embedded/" in out and "badnets → 2" in out and f"| {rec['verdict']} |" in out
    assert "kdguard" in out and "/2" in out  # two poisoned records counted


def test_sr_unlearns_the_audits_trigger_in_data_free_kd(audit_dir, teacher_dir, tmp_path, capsys):
    out = tmp_path / "zskt_sr_audit"
    assert main(["distill-datafree", f"teacher={teacher_dir}", "method=zskt", "preset=cpu", "student=lenet5",
                 "schedule.rounds=4", "schedule.batch_size=16", "schedule.student_steps=2", "generator.width=8",
                 "monitor.every=4", "monitor.grid_every=0", "progress=false", "abd.mode=sr", "abd.sr.phase=0.5",
                 "--from-audit", str(audit_dir), "--audit-class", "2", f"out={out}"]) == 0
    sr = read_json(out / "metrics.json")["abd"]["sr"]
    assert sr["perturbation"] == "given trigger" and sr["audit_class"] == 2 and sr["sr_steps"] == 4
    assert sr["from_audit"] == str(audit_dir)
    # the oracle: the teacher's own recorded trigger, for analysis
    oracle = tmp_path / "zskt_sr_oracle"
    assert main(["distill-datafree", f"teacher={teacher_dir}", "method=zskt", "preset=cpu", "student=lenet5",
                 "schedule.rounds=4", "schedule.batch_size=16", "schedule.student_steps=2", "generator.width=8",
                 "monitor.every=4", "monitor.grid_every=0", "progress=false", "abd.mode=sr", "abd.sr.phase=0.5",
                 "abd.sr.oracle_trigger=true", f"out={oracle}"]) == 0
    sr = read_json(oracle / "metrics.json")["abd"]["sr"]
    assert sr["perturbation"] == "given trigger" and sr["oracle_trigger"] and sr["sr_steps"] == 4
    assert sr["modules"] is None
    # the unlearning confined to the convolutions (abd.sr.modules)
    confined = tmp_path / "zskt_sr_conv"
    assert main(["distill-datafree", f"teacher={teacher_dir}", "method=zskt", "preset=cpu", "student=lenet5",
                 "schedule.rounds=4", "schedule.batch_size=16", "schedule.student_steps=2", "generator.width=8",
                 "monitor.every=4", "monitor.grid_every=0", "progress=false", "abd.mode=sr", "abd.sr.phase=0.5",
                 "abd.sr.modules=[block1,block2]", f"out={confined}"]) == 0
    assert read_json(confined / "metrics.json")["abd"]["sr"]["modules"] == ["block1", "block2"]
    for args, needle in (
            (["abd.mode=sv", "--from-audit", str(audit_dir)], "runs no SR"),
            (["abd.mode=sr", "--audit-class", "2"], "--from-audit"),
            (["abd.mode=sr", "--from-audit", str(teacher_dir)], "audit"),
            (["abd.mode=sr", "--from-audit", str(audit_dir), "--audit-class", "10"], "outside the audit"),
            (["abd.mode=sr", "--from-audit", str(audit_dir), "abd.sr.audit_reference=oracle"], "audit_reference"),
            (["abd.mode=sr", "--from-audit", str(audit_dir), "abd.sr.oracle_trigger=true"], "keep one of them"),
            (["abd.mode=sv", "abd.sr.oracle_trigger=true"], "runs no SR"),
            (["abd.mode=sr", "abd.sr.modules=[fc9]"], "abd.sr.modules: module path 'fc9' does not exist"),
            (["abd.mode=sr", "abd.sr.modules=[pool]"], "holds no trainable parameter"),
            (["abd.mode=sr", "abd.sr.modules=[]"], "non-empty list")):
        assert needle in cli_error(["distill-datafree", f"teacher={teacher_dir}", "method=zskt", "preset=cpu", "student=lenet5",
                                    "schedule.rounds=2", "progress=false", f"out={tmp_path / 'x'}", *args], capsys)
