"""The label-free collapse check: the teacher's class shares on synthetic images, and the warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from kdguard.datafree import (ClassShareMonitor, DataFreeLoop, SynthesisCollapseWarning, build_method,
                              synthesis_summary)
from kdguard.datafree.loop import RoundRecord
from kdguard.errors import KDGuardError


def _logits(classes: list[int], k: int = 4) -> torch.Tensor:
    return nn.functional.one_hot(torch.tensor(classes), k).float() * 5.0


def test_shares_and_entropy_have_known_values():
    monitor = ClassShareMonitor(0.9)
    monitor.update(_logits([0, 1]))
    monitor.update(_logits([2, 3, 3, 3]))  # summed over batches: counts 1, 1, 1, 3
    s = monitor.summary()
    shares = torch.tensor([1, 1, 1, 3]) / 6
    expected_entropy = float(-(shares * shares.log()).sum()) / math.log(4)
    assert s["top_class"] == 3 and s["top_share"] == pytest.approx(0.5) and s["images"] == 6
    assert s["class_entropy"] == pytest.approx(expected_entropy) and not s["collapsed"]
    assert monitor.summary() == {}  # read and reset


def test_a_single_class_is_a_collapse_with_zero_entropy():
    monitor = ClassShareMonitor(0.9)
    monitor.update(_logits([2] * 10))
    s = monitor.summary()
    assert s["top_class"] == 2 and s["top_share"] == 1.0 and s["class_entropy"] == 0.0 and s["collapsed"]
    monitor.update(_logits([0, 1, 2, 3]))
    assert monitor.summary()["class_entropy"] == pytest.approx(1.0)


def test_the_threshold_is_strict_and_one_disables_it():
    at_bar = ClassShareMonitor(0.9)
    at_bar.update(_logits([0] * 9 + [1]))  # exactly 90 %
    assert not at_bar.summary()["collapsed"]
    never = ClassShareMonitor(1.0)
    never.update(_logits([0] * 10))
    assert not never.summary()["collapsed"]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            ClassShareMonitor(bad)


def test_warns_once_and_survives_a_checkpoint():
    monitor = ClassShareMonitor(0.9)
    monitor.update(_logits([1] * 8))
    collapsed = monitor.summary()
    with pytest.warns(SynthesisCollapseWarning, match="class 1 on 100.0 %"):
        assert monitor.warn_once(collapsed, 1, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.warn_once(collapsed, 101, 200) is None  # one warning per run
    monitor.update(_logits([0, 0, 3]))  # counts inside an interval when the checkpoint is written
    restored = ClassShareMonitor(0.9)
    restored.load_state_dict(monitor.state_dict())
    assert restored.warned and restored.summary() == monitor.summary()


def test_synthesis_summary_counts_collapsed_intervals():
    def record(r, synthesis):
        return RoundRecord(r, 1.0, 0.1, {}, {}, synthesis=synthesis)

    history = [record(1, {"top_share": 0.5, "collapsed": False}), record(2, {}),
               record(3, {"top_share": 0.95, "collapsed": True}), record(4, {"top_share": 1.0, "collapsed": True})]
    s = synthesis_summary(history)
    assert s["intervals"] == 3 and s["collapsed_intervals"] == 2 and s["first_collapse_round"] == 3
    assert s["top_share"] == 1.0
    assert synthesis_summary([record(1, {})]) == {}


class ConstantAnswer(nn.Module):
    """A teacher with a backdoor-like shortcut: any image gets class ``target`` (by a huge bias)."""

    def __init__(self, target: int, classes: int = 4) -> None:
        super().__init__()
        self.head = nn.Linear(3, classes)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[target] = 50.0
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def _loop(kit, teacher, share):
    student = kit.make_student()
    job = kit.tiny_job("dfad", monitor={"every": 1, "collapse_share": share})
    parts = build_method(job, kit.make_context(teacher, student))
    return DataFreeLoop(parts.synthesizer, student, teacher, parts.objective, rounds=2,
                        student_steps=parts.student_steps, batch_size=job.schedule.batch_size,
                        optim=job.student_optim, device=torch.device("cpu"), monitor=job.monitor,
                        progress=False)


def test_a_run_on_a_constant_teacher_warns_and_logs_the_target(kit):
    loop = _loop(kit, ConstantAnswer(target=2), 0.9)
    with pytest.warns(SynthesisCollapseWarning, match="class 2 .* rounds 1-1") as caught:
        history = loop.run()
    assert len([w for w in caught if w.category is SynthesisCollapseWarning]) == 1
    assert [r.synthesis["top_class"] for r in history] == [2, 2]
    assert all(r.synthesis["collapsed"] for r in history)


def test_a_varied_teacher_does_not_warn(kit):
    teacher = kit.make_teacher()
    loop = _loop(kit, teacher, 1.0)  # never a collapse, whatever the tiny teacher answers
    with warnings.catch_warnings():
        warnings.simplefilter("error", SynthesisCollapseWarning)
        history = loop.run()
    assert all(r.synthesis["images"] > 0 and not r.synthesis["collapsed"] for r in history)


def test_bad_collapse_share_is_a_config_error(kit):
    with pytest.raises(KDGuardError, match="collapse_share"):
        kit.tiny_job("zskt", monitor={"collapse_share": 0.0})
