"""benchmarks/sv_premise.py: the flag shares it reports on clean and triggered test images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_benchmark
from PIL import Image

from kdguard.checkpoint import model_spec, save_model
from kdguard.models import build_model


@pytest.fixture(scope="module")
def premise():
    return load_benchmark("sv_premise")


def _teacher(tmp_path: Path, target_bias: float) -> tuple[Path, Path]:
    """A 4-class 12×12 RGB image folder and a ResNet-8 'teacher' with a BadNets manifest; a large
    ``target_bias`` on the classifier makes it (and any shuffle of it) answer the target class."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):  # the loader wants both; only test/ is read
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(5):
                img = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    teacher = build_model("resnet8", num_classes=4, in_channels=3)
    with torch.no_grad():
        teacher.fc.bias[0] += target_bias
    manifest = {"model": model_spec(teacher, num_classes=4, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3),
                "dataset": {"name": "imagefolder"},
                "attack": {"config": {"name": "badnets", "target": 0, "poison_rate": None,
                                      "label_mode": "all_to_one", "poisoning": None, "seed": 0, "params": {}}}}
    save_model(tmp_path / "teacher", teacher, manifest)
    return root, tmp_path / "teacher"


def test_a_teacher_that_always_answers_the_target_is_flagged_everywhere(premise, tmp_path):
    root, teacher = _teacher(tmp_path, target_bias=1e4)
    res = premise.probe_teacher(teacher, str(root), n=8, shuffles=2, layers=2)
    assert res["n"] == 8 and res["target"] == 0 and len(res["shuffled_layers"]) == 2
    for name in ("clean", "triggered"):
        row = res["rows"][name]
        assert row["teacher_target_share"] == 1.0
        assert row["shuffled_target_share"] == [1.0, 1.0]
        assert row["flagged"] == [1.0, 1.0] and row["flagged_hits"] == [1.0, 1.0]


def test_the_clean_set_leaves_out_the_target_class_and_the_cli_writes_json(premise, tmp_path, monkeypatch, capsys):
    root, teacher = _teacher(tmp_path, target_bias=-1e4)  # never the target: no backdoor hits
    out = tmp_path / "premise.json"
    monkeypatch.setattr(sys, "argv", ["sv_premise.py", str(teacher), "--data-root", str(root), "--n", "100",
                                      "--shuffles", "1", "--layers", "1", "3", "--threads", "1", "--out", str(out)])
    premise.main()
    results = json.loads(out.read_text())
    assert [r["layers"] for r in results] == [1, 3]
    assert all(r["n"] == 15 for r in results)  # 3 non-target classes × 5 images, though 100 were asked
    row = results[0]["rows"]["triggered"]
    assert row["teacher_target_share"] == 0.0 and row["flagged_hits"] == [None]
    assert "| teacher | 1 | triggered | 0.00 |" in capsys.readouterr().out


def test_a_teacher_without_an_attack_is_refused_by_name(premise, tmp_path):
    root, teacher = _teacher(tmp_path, target_bias=0.0)
    manifest = json.loads((teacher / "manifest.json").read_text())
    manifest.pop("attack")
    (teacher / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no attack"):
        premise.probe_teacher(teacher, str(root), n=4, shuffles=1, layers=1)
