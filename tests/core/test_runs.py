"""kdguard.runs: the run context every job opens and the manifest built in one place."""

from __future__ import annotations

import json

import torch

from kdguard.attacks import make_attack
from kdguard.config import AttackConfig, TeacherJob
from kdguard.rundir import read_run_record
from kdguard.runs import OMIT, RunContext, build_manifest


def test_open_writes_the_identity_and_sets_threads_and_device(tmp_path):
    job = TeacherJob(out=str(tmp_path / "run"), seed=3)
    before = torch.get_num_threads()
    try:
        ctx = RunContext.open(job, threads=1, device="cpu")
        assert torch.get_num_threads() == 1 and ctx.threads == 1
    finally:
        torch.set_num_threads(before)
    assert ctx.out == tmp_path / "run" and ctx.seed == 3 and ctx.device == torch.device("cpu")
    assert read_run_record(ctx.out)["job"] == "TeacherJob" and (ctx.out / "config.yaml").exists()


def test_attack_is_the_jobs_else_the_manifests():
    cfg = AttackConfig(name="badnets", target=1)
    spec = make_attack(cfg, (1, 12, 12), 4)
    manifest = {"attack": build_manifest("teacher", TeacherJob(), metrics={}, attack=(cfg, spec))["attack"]}
    from_manifest, spec2 = RunContext.attack(None, manifest, (1, 12, 12), 4)
    assert from_manifest.name == "badnets" and spec2.target == 1
    own = AttackConfig(name="blend", target=2)
    assert RunContext.attack(own, manifest, (1, 12, 12), 4)[0] is own
    assert RunContext.attack(None, {}, (1, 12, 12), 4) == (None, None)


def test_manifest_keys_come_in_one_order():
    m = build_manifest("student", TeacherJob(), metrics={"ca": 0.5}, head={"method": "m", "seed": 0},
                       links={"teacher": "t"}, model={"arch": "lenet5"}, dataset=None, attack=None,
                       body={"targets": []}, tail={"teacher_metrics": {}})
    assert list(m) == ["role", "method", "seed", "config", "teacher", "model", "dataset", "attack", "targets",
                       "metrics", "teacher_metrics"]
    ssl = build_manifest("clean_encoder", TeacherJob(), metrics={}, model=OMIT, dataset={"name": "x"})
    assert list(ssl) == ["role", "config", "dataset", "metrics"]
    json.dumps(m)
