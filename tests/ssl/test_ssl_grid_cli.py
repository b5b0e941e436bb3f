"""The SSL track end to end on tiny registered blobs: CLI pretrain → BadEncoder → probe → defend → grid."""

from __future__ import annotations

import pytest

from kdguard.cli import main
from kdguard.io import read_json
from kdguard.ssl.encoder import load_ssl_model
from kdguard.ssl.grid import grid_cells

TINY = """
train: {epochs: 1, batch_size: 16, progress: false, amp: "off", channels_last: "off", device: cpu}
"""

BLOBS = "ssl_test_blobs"  # registered by tests/ssl/conftest.py

TARGETS = f"""
targets:
  - {{dataset: {BLOBS}, target: 1, trigger: badnets_square, trigger_params: {{size: 4, position: [11, 11]}}}}
"""

PROBE = """
probe: {hidden: [16], epochs: 2, batch_size: 16, lr: 0.001, device: cpu}
"""

STAGE = """{epochs: 1, batch_size: 16, progress: false, amp: "off", channels_last: "off", device: cpu,
   optim: {name: adam, lr: 0.001, weight_decay: 0.000001, schedule: constant}}"""

DEFENSE = f"""
defense:
  clean_fraction: 0.5
  train: {STAGE}
  finetune: {STAGE}
  warmup: {STAGE}
"""


def _yaml(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A clean and a BadEncoder-poisoned ResNet-8 on the blobs (1 epoch each)."""
    tmp = tmp_path_factory.mktemp("ssl")
    clean, poisoned = tmp / "clean", tmp / "poisoned"
    cfg = _yaml(tmp, "pre.yaml", TINY + "encoder: {arch: resnet8, proj_hidden: 16, proj_dim: 8}\n")
    assert main(["ssl-pretrain", "-c", cfg, f"data.name={BLOBS}", "knn_k=5", f"out={clean}"]) == 0
    cfg = _yaml(tmp, "bad.yaml", TINY + TARGETS)
    assert main(["badencoder", "-c", cfg, f"--encoder={clean}", f"shadow.name={BLOBS}", f"out={poisoned}"]) == 0
    return clean, poisoned


def test_pretrain_and_badencoder_write_complete_runs(encoders):
    clean, poisoned = encoders
    assert 0 <= read_json(clean / "metrics.json")["knn_acc"] <= 1
    _, manifest = load_ssl_model(poisoned)
    assert manifest["role"] == "poisoned_encoder"
    assert manifest["targets"][0]["target"] == 1 and manifest["targets"][0]["trigger"]["size"] == [4, 4]
    assert {"l0", "l1", "l2"} <= set(read_json(poisoned / "metrics.json"))
    assert list(poisoned.glob("trigger_preview_*.png"))
    # a finished stage is reused, not retrained
    lines = (clean / "metrics.jsonl").read_text().count("\n")
    cfg = str(clean.parent / "pre.yaml")
    assert main(["ssl-pretrain", "-c", cfg, f"data.name={BLOBS}", "knn_k=5", f"out={clean}"]) == 0
    assert (clean / "metrics.jsonl").read_text().count("\n") == lines


def test_a_finished_run_can_be_extended_but_not_changed(encoders, tmp_path, capsys):
    clean, _ = encoders
    out = tmp_path / "pre"
    cfg = str(clean.parent / "pre.yaml")
    base = ["ssl-pretrain", "-c", cfg, f"data.name={BLOBS}", "knn_k=0", f"out={out}"]
    assert main(base) == 0
    assert main(base + ["train.epochs=2", "--resume"]) == 0  # one more epoch, resumed from train_state.pt
    epochs = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and read_json(out / "metrics.json")["epochs"] == 2
    assert "other settings" in _error(base + ["train.epochs=2", "temperature=0.2"], capsys)


def test_probe_reads_the_attack_from_the_manifest(encoders, tmp_path, capsys):
    clean, poisoned = encoders
    cfg = _yaml(tmp_path, "probe.yaml", PROBE)
    assert main(["ssl-probe", "-c", cfg, f"--encoder={poisoned}", f"datasets=[{BLOBS}]",
                 f"out={tmp_path / 'p'}"]) == 0
    res = read_json(tmp_path / "p" / "probe.json")["results"][BLOBS]
    assert res["target"] == 1 and res["n_test"] == 32 and res["n_backdoor"] == 24
    assert res["asr"] is not None and res["asr_all"] is not None
    assert "CA / ASR / ASR-all" in capsys.readouterr().out
    assert main(["ssl-probe", "-c", cfg, f"--encoder={clean}", f"datasets=[{BLOBS}]",
                 f"out={tmp_path / 'c'}"]) == 0
    assert read_json(tmp_path / "c" / "probe.json")["results"][BLOBS]["asr"] is None  # clean: CA only


def test_grid_one_at_a_time_writes_one_table_and_resumes(encoders, tmp_path):
    clean, poisoned = encoders
    out = tmp_path / "grid"
    cfg = _yaml(tmp_path, "grid.yaml", PROBE + DEFENSE + f"""
teachers: [finetuned, poisoned]
students: [warmup, random]
losses: [at, sp]
cells: one_at_a_time
datasets: [{BLOBS}]
data: {{name: {BLOBS}}}
""")
    args = ["ssl-grid", "-c", cfg, f"--encoder={poisoned}", f"clean_encoder={clean}", f"out={out}"]
    assert main(args) == 0
    grid = read_json(out / "grid.json")
    cells = [r for r in grid["rows"] if r["kind"] == "cell"]
    assert [r["label"] for r in cells] == ["finetuned-warmup-at", "poisoned-warmup-at", "finetuned-random-at",
                                           "finetuned-warmup-sp"]
    assert [r["label"] for r in grid["rows"] if r["kind"] != "cell"] == ["clean encoder", "poisoned encoder",
                                                                         "teacher: finetuned",
                                                                         "student: warmup (before distillation)"]
    warm = next(r for r in grid["rows"] if r["kind"] == "student")
    assert warm["results"][BLOBS]["asr"] is not None and "ca_cost" in warm
    assert not any("meets_goal" in r for r in grid["rows"] if r["kind"] != "cell")
    for r in cells:
        assert r["results"][BLOBS]["asr"] is not None and "ca_cost" in r and isinstance(r["meets_goal"], bool)
    table = (out / "grid.md").read_text()
    assert table.count("\n") == 2 + len(grid["rows"]) and "finetuned-warmup-sp" in table
    # resumed: everything is cached, nothing is trained again
    history = out / "cells" / "finetuned-warmup-at" / "metrics.jsonl"
    before = history.read_text()
    assert main(args) == 0 and history.read_text() == before


def test_defend_runs_one_cell(encoders, tmp_path):
    _, poisoned = encoders
    cfg = _yaml(tmp_path, "defend.yaml", PROBE + DEFENSE + f"datasets: [{BLOBS}]\ndata: {{name: {BLOBS}}}\n")
    assert main(["ssl-defend", "-c", cfg, f"--encoder={poisoned}", "teacher=fine_pruning", "student=poisoned",
                 "loss=kd", f"out={tmp_path / 'd'}"]) == 0
    rows = read_json(tmp_path / "d" / "grid.json")["rows"]
    assert [r["label"] for r in rows] == ["poisoned encoder", "fine_pruning-poisoned-kd"]


def test_grid_cells_modes():
    assert len(grid_cells(["poisoned", "finetuned", "nad", "fine_pruning"], ["random", "warmup", "poisoned"],
                          ["at", "afd", "fitnet", "cc", "kd", "sp"])) == 72
    assert len(grid_cells(["finetuned", "poisoned"], ["warmup", "random"], ["at", "fitnet"], "one_at_a_time")) == 4


def _error(args, capsys) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_gives_one_line_errors(encoders, tmp_path, capsys):
    clean, poisoned = encoders
    assert "unknown teacher 'teach'" in _error(["ssl-grid", f"--encoder={poisoned}", "teachers=[teach]",
                                                 f"out={tmp_path / 'g'}"], capsys)
    assert "unknown SSL distillation loss 'mse'" in _error(["ssl-defend", f"--encoder={poisoned}", "loss=mse",
                                                            f"out={tmp_path / 'g'}"], capsys)
    assert "not an SSL encoder checkpoint" in _error(["ssl-probe", f"--encoder={tmp_path}",
                                                      f"out={tmp_path / 'p'}"], capsys)
    assert "required setting 'encoder'" in _error(["badencoder", f"out={tmp_path / 'b'}"], capsys)
    assert "unknown cell mode 'random'" in _error(["ssl-grid", f"--encoder={poisoned}", "cells=random",
                                               f"out={tmp_path / 'g'}"], capsys)
