"""The round-cost measurement behind the speed benchmarks (kdguard.jobs.datafree_cost)."""

from __future__ import annotations

import torch

from kdguard.jobs import build_datafree_job
from kdguard.jobs.datafree_cost import ImageCounter, RoundVariant, cost_table, median_run, round_cost
from kdguard.models import build_model

TINY = ["teacher=unused", "student=resnet8", "preset=cpu", "schedule.batch_size=8", "schedule.generator_steps=1",
        "schedule.student_steps=2"]


def _models():
    torch.manual_seed(0)
    return (build_model("resnet8", num_classes=10, in_channels=3), build_model("resnet8", num_classes=10, in_channels=3))


def test_round_cost_splits_a_round_and_counts_its_work():
    job = build_datafree_job(None, ["method=zskt", *TINY, "abd.mode=sv"])
    teacher, student = _models()
    r = round_cost(job, teacher, student, (3, 16, 16), torch.device("cpu"), rounds=2, warmup=1)
    assert r["seconds_per_round"] > 0 and 0 < r["synthesis_seconds"] <= r["seconds_per_round"]
    assert abs(r["synthesis_seconds"] + r["student_seconds"] - r["seconds_per_round"]) < 1e-9
    # ZSKT: per round one generator step and two student steps on a batch of 8 (teacher reused)
    assert r["teacher_images_per_s"] > 0 and r["student_images_per_s"] > 0
    assert r["gflop_per_round"] > 0 and r["student_steps"] == 2 and r["batch"] == 8
    assert r["sv_flagged_share"] is not None
    assert not teacher._forward_pre_hooks and not student._forward_pre_hooks  # counters removed
    table = cost_table([median_run([{**r, "method": "zskt", "variant": "fp32", "abd": "sv"}])], {"fp32": 100.0})
    assert table.count("\n") == 2 and "| zskt | fp32 | sv | 8 |" in table


def test_teacher_rerun_per_student_step_costs_more_teacher_passes():
    job = build_datafree_job(None, ["method=zskt", *TINY])
    reused = round_cost(job, *_models(), (3, 16, 16), torch.device("cpu"), rounds=1)
    rerun = round_cost(job, *_models(), (3, 16, 16), torch.device("cpu"), RoundVariant(reuse_batch=False), rounds=1)
    per_round = {k: r["teacher_images_per_s"] * r["seconds_per_round"] for k, r in (("reused", reused), ("rerun", rerun))}
    assert per_round["rerun"] > per_round["reused"]


def test_image_counter_and_median_run():
    model = torch.nn.Identity()
    counter = ImageCounter(model)
    model(torch.zeros(5, 1)), model(torch.zeros(3, 1))
    assert counter.images == 8
    runs = [{"seconds_per_round": s, "tag": t} for s, t in ((3.0, "c"), (1.0, "a"), (2.0, "b"), (4.0, "d"))]
    m = median_run(runs)
    assert m["tag"] == "b" and m["repeats"] == 4 and m["samples"] == [3.0, 1.0, 2.0, 4.0]
