"""The comparison table's target verdict (benchmarks/robustkd_compare.py)."""

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def compare():
    return load_benchmark("robustkd_compare")


def _summary(kd: dict, robustkd: dict, ce_only: dict | None = None) -> dict:
    methods = {"ce_only": {**ce_only, "defence_seconds": 0.0}} if ce_only else {}
    methods.update(kd={**kd, "defence_seconds": 0.0}, robustkd={**robustkd, "defence_seconds": 5.0})
    return {"teacher": "runs/t", "dataset": "gtsrb", "student": "resnet8", "num_classes": 43,
            "teacher_metrics": {"ca": 0.98, "asr": 1.0}, "attack": {"name": "badnets"}, "methods": methods}


def _target(text: str) -> str:
    return [line for line in text.splitlines() if line.startswith("| robustkd |")][0].split("|")[-2].strip()


def test_target_met_and_missed(compare):
    kd = {"ca": 0.90, "asr": 0.60, "asr_no_trigger": 0.02}
    assert _target(compare.table(_summary(kd, {"ca": 0.88, "asr": 0.05, "asr_no_trigger": 0.02}))) == "yes"
    assert _target(compare.table(_summary(kd, {"ca": 0.86, "asr": 0.05, "asr_no_trigger": 0.02}))) == "no"  # CA
    assert _target(compare.table(_summary(kd, {"ca": 0.90, "asr": 0.07, "asr_no_trigger": 0.02}))) == "no"  # cut 88 %


def test_no_verdict_when_kd_carries_no_backdoor_or_failed(compare):
    # KD's ASR equals its no-trigger rate: a 90 % cut of it would only measure noise
    kd = {"ca": 0.96, "asr": 0.015, "asr_no_trigger": 0.015}
    text = compare.table(_summary(kd, {"ca": 0.96, "asr": 0.001, "asr_no_trigger": 0.001}))
    assert _target(text) == "n/a (KD does not carry the backdoor)" and "| 1.50 | 1.50 |" in text
    # a small but real transfer (4 points over a 0 % no-trigger rate) is judged
    kd = {"ca": 0.97, "asr": 0.04, "asr_no_trigger": 0.0}
    assert _target(compare.table(_summary(kd, {"ca": 0.97, "asr": 0.003, "asr_no_trigger": 0.0}))) == "yes"
    kd = {"ca": 0.02, "asr": 0.9, "asr_no_trigger": 0.1}
    assert _target(compare.table(_summary(kd, {"ca": 0.5, "asr": 0.0, "asr_no_trigger": 0.0}))) == "n/a (KD at chance)"


def test_no_verdict_when_a_student_without_teacher_reaches_kds_asr(compare):
    kd, rkd = {"ca": 0.97, "asr": 0.04, "asr_no_trigger": 0.0}, {"ca": 0.97, "asr": 0.003, "asr_no_trigger": 0.0}
    text = compare.table(_summary(kd, rkd, ce_only={"ca": 0.95, "asr": 0.035, "asr_no_trigger": 0.0}))
    assert _target(text) == "n/a (KD does not carry the backdoor)"
    assert [line for line in text.splitlines() if line.startswith("| ce_only |")][0].split("|")[-2].strip() \
        == "— (no teacher)"
    # a floor well below KD's ASR leaves the verdict to the cut
    text = compare.table(_summary(kd, rkd, ce_only={"ca": 0.95, "asr": 0.004, "asr_no_trigger": 0.0}))
    assert _target(text) == "yes"


def test_cut_against_ofd_is_given_for_detoxified_students_only(compare):
    summary = _summary({"ca": 0.97, "asr": 0.04, "asr_no_trigger": 0.0}, {"ca": 0.96, "asr": 0.05})
    summary["methods"]["ofd"] = {"ca": 0.97, "asr": 0.40, "defence_seconds": 0.0}
    rows = {line.split("|")[1].strip(): line.split("|") for line in compare.table(summary).splitlines()
            if line.startswith("| ")}
    assert rows["robustkd"][7].strip() == "88 %"  # 1 − 5/40
    assert rows["ofd"][7].strip() == "—" and rows["kd"][7].strip() == "—"


def test_each_dataset_and_seed_has_its_own_cache(compare, tmp_path):
    """Stages are cached per dataset and seed: a GTSRB teacher never reads a CIFAR-10 teacher's
    students of the same name, and --seed 1 never reads seed 0's."""
    import json

    teacher = tmp_path / "gtsrb" / "teacher_badnets"
    teacher.mkdir(parents=True)
    (teacher / "manifest.json").write_text(json.dumps({"dataset": {"name": "gtsrb", "classes": ["a", "b"]}}))
    (teacher / "model.safetensors").write_bytes(b"")  # only the manifest is read
    out = tmp_path / "out"
    for folder, ca in (("cifar10/teacher_badnets", 0.1), ("gtsrb/teacher_badnets", 0.2),
                       ("gtsrb/teacher_badnets_s1", 0.3)):
        run = out / "compare" / folder / "kd"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"ca": ca, "asr": 0.0}))
    seed0 = compare.compare(teacher, out, None, 1.0, "cpu", 0, ["kd"], None)
    seed1 = compare.compare(teacher, out, None, 1.0, "cpu", 1, ["kd"], None)
    assert seed0["methods"]["kd"]["ca"] == 0.2 and seed1["methods"]["kd"]["ca"] == 0.3
