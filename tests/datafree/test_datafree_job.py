"""The data-free job (:mod:`kdguard.jobs.datafree`): ABD composed in by the jobs layer, a run
stopped early and continued in a copy, extension factories, the thread count as a parameter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from kdguard.abd import ABDConfig
from kdguard.config import AttackConfig, DataConfig, OptimConfig, TeacherJob, TrainConfig
from kdguard.datafree import DataFreeJob
from kdguard.datafree import build_datafree_job as build_base_job
from kdguard.datafree.loop import saved_round
from kdguard.errors import KDGuardError
from kdguard.jobs import (DataFreeABDJob, abd_extensions, build_datafree_job, fork_datafree_run, run_datafree,
                          train_teacher)
from kdguard.rundir import job_record


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 1-epoch BadNets LeNet-5 on the embedded MNIST digits."""
    out = tmp_path_factory.mktemp("teacher")
    job = TeacherJob(data=DataConfig(name="mnist_embedded", val_fraction=0.05),
                     attack=AttackConfig(name="badnets", target=0, poison_rate=0.1), model="lenet5",
                     train=TrainConfig(epochs=1, batch_size=64, progress=False, optim=OptimConfig(name="sgd", lr=0.05)),
                     out=str(out))
    train_teacher(job)
    return out


def _job(teacher, out, *extra):
    return build_datafree_job(None, [f"teacher={teacher}", "method=zskt", "preset=cpu", "student=lenet5",
                                     "schedule.rounds=2", "schedule.batch_size=16", "schedule.student_steps=2",
                                     "generator.width=8", "monitor.every=1", "monitor.grid_every=0",
                                     "progress=false", f"out={out}", *extra])


def test_abd_is_composed_by_the_jobs_layer():
    assert "abd" not in {f.name for f in dataclasses.fields(DataFreeJob)}
    with pytest.raises(KDGuardError):
        build_base_job(None, ["teacher=t", "abd.mode=full"])  # the feature package knows no ABD
    job = build_datafree_job(None, ["teacher=t", "abd.mode=full", "abd.sr.phase=0.05"])
    assert isinstance(job, DataFreeABDJob) and isinstance(job.abd, ABDConfig)
    assert job.abd.mode == "full" and job.abd.sr.phase == 0.05
    # the composed schema keeps the run identity of the job it extends
    assert job_record(job)["job"] == "DataFreeJob"
    with pytest.raises(KDGuardError, match="abd.sv.form=generator"):
        build_datafree_job(None, ["teacher=t", "method=ood", "abd.mode=sv", "abd.sv.form=generator"])


def test_a_stopped_run_continues_in_a_copy_with_abd(teacher, tmp_path):
    prefix = tmp_path / "prefix"
    partial = run_datafree(_job(teacher, prefix, "abd.mode=sv", "schedule.stop_after=1"))
    assert partial.metrics["finished"] is False and partial.metrics["round"] == 1
    assert partial.metrics["abd"]["mode"] == "sv" and partial.metrics["abd"]["sv"]["flag_samples"] > 0
    assert not (prefix / "metrics.json").exists()

    out = tmp_path / "full"
    job = fork_datafree_run(prefix, out, ["abd.mode=full", "abd.sr.phase=0.5", "schedule.stop_after=null"])
    result = run_datafree(job)
    assert result.metrics["rounds"] == 2 and result.metrics["abd"]["mode"] == "full"
    assert result.metrics["abd"]["sr"]["sr_steps"] > 0 and "sv" in result.metrics["abd"]
    first = (prefix / "metrics.jsonl").read_text().splitlines()[0]
    assert (out / "metrics.jsonl").read_text().splitlines()[0] == first  # round 1 is the prefix's
    assert yaml.safe_load((out / "config.yaml").read_text())["abd"]["mode"] == "full"
    assert saved_round(prefix) == 1  # the prefix is left as it was


def test_an_extension_factory_and_the_thread_count_are_parameters(teacher, tmp_path):
    calls = []

    def factory(job, setup):
        calls.append((job.method, tuple(setup.test.shape)))
        return abd_extensions(job, setup)

    before = torch.get_num_threads()
    try:
        result = run_datafree(_job(teacher, tmp_path / "run", "abd.mode=sv"), extensions=factory, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert calls == [("zskt", (1, 28, 28))]
    assert result.metrics["abd"]["mode"] == "sv" and result.metrics["rounds"] == 2
