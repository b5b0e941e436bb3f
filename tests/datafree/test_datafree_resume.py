"""A run stopped after k rounds and resumed makes exactly the steps of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from kdguard.datafree import DataFreeExtensions, DataFreeLoop, build_method
from kdguard.datafree.loop import STATE_FILE
from kdguard.errors import KDGuardError


class CountingWeighting:
    """A stateful sample weighting (like ABD's vaccine): its counter must survive a resume."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, per_sample, x, teacher_logits):
        self.calls += 1
        return {"kd": per_sample.mean()}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


def _build(kit, method, run_dir, rounds=4):
    teacher, student = kit.make_teacher(), kit.make_student()
    job = kit.tiny_job(method, monitor={"every": 1, "checkpoint_every": 1})
    torch.manual_seed(123)  # the generator's initial weights come from the global RNG
    parts = build_method(job, kit.make_context(teacher, student))
    weighting = CountingWeighting()
    loop = DataFreeLoop(parts.synthesizer, student, teacher, parts.objective, rounds=rounds,
                        student_steps=parts.student_steps, batch_size=job.schedule.batch_size,
                        optim=job.student_optim, device=torch.device("cpu"), run_dir=run_dir,
                        evaluate=lambda m: {"probe": float(sum(p.detach().sum() for p in m.parameters()))},
                        monitor=job.monitor, progress=False,
                        extensions=DataFreeExtensions(sample_weighting=weighting))
    return loop, student, weighting


@pytest.mark.parametrize("method", ["zskt", "cmi", "ood"])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(kit, tmp_path, method):
    straight, s_straight, w_straight = _build(kit, method, tmp_path / "straight")
    straight.run()

    first, _, _ = _build(kit, method, tmp_path / "resumed")
    first.run(stop_after=2)  # as if the process had been killed after round 2
    assert torch.load(tmp_path / "resumed" / STATE_FILE, weights_only=True)["round"] == 2
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # a line written after the checkpoint
        f.write(json.dumps({"round": 99}) + "\n")

    second, s_resumed, w_resumed = _build(kit, method, tmp_path / "resumed")
    second.run()
    for (k, a), b in zip(s_straight.state_dict().items(), s_resumed.state_dict().values()):
        assert torch.equal(a, b), f"{method}: student {k} differs after resuming"
    assert w_resumed.calls == w_straight.calls
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4]
    straight_lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["eval"] for x in straight_lines] == [r["eval"] for r in lines]
    assert [json.loads(x)["synthesis"] for x in straight_lines] == [r["synthesis"] for r in lines]


def test_resume_refuses_a_foreign_checkpoint(kit, tmp_path):
    loop, _, _ = _build(kit, "zskt", tmp_path / "run", rounds=1)
    loop.run()
    other, _, _ = _build(kit, "cmi", tmp_path / "run", rounds=1)
    with pytest.raises(KDGuardError, match="cannot resume"):
        other.run()
