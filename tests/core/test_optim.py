"""The one optimiser builder and the one learning-rate schedule (kdguard.optim)."""

from __future__ import annotations

import math

import pytest
import torch

from kdguard.abd.retrospection import SelfRetrospection
from kdguard.config import OptimConfig
from kdguard.abd.config import SelfRetrospectionConfig
from kdguard.errors import KDGuardError
from kdguard.optim import advance, build_optimizer, current_lr, epoch_factor, lr_scheduler


def _opt(cfg: OptimConfig) -> torch.optim.Optimizer:
    return build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)


def _closed_form(cfg: OptimConfig, step: int, total: int, warm: float) -> float:
    p = step / total
    if cfg.schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    elif cfg.schedule == "multistep":
        f = cfg.gamma ** sum(p >= m for m in cfg.milestones)
    else:
        f = 1.0
    if warm > 0 and step < warm:
        f *= (step + 1) / warm
    return cfg.lr * f


@pytest.mark.parametrize("kw", [dict(schedule="cosine"), dict(schedule="cosine", warmup_epochs=1.5),
                                dict(schedule="multistep", milestones=[0.3, 0.6], gamma=0.2),
                                dict(name="adam", lr=2e-3, schedule="constant")])
def test_scheduler_learning_rates_equal_the_closed_form_bit_for_bit(kw):
    cfg = OptimConfig(**{"lr": 0.05, **kw})
    epochs, steps = 4, 3
    opt = _opt(cfg)
    sched = lr_scheduler(opt, cfg.lr, epoch_factor(cfg, epochs=epochs, steps_per_epoch=steps))
    seen = []
    for _ in range(epochs * steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [_closed_form(cfg, s, epochs * steps, cfg.warmup_epochs * steps) for s in range(epochs * steps)]
    # a scheduler built at a later step (a resumed run) sits exactly where the first one was
    later = lr_scheduler(_opt(cfg), cfg.lr, epoch_factor(cfg, epochs=epochs, steps_per_epoch=steps), start=7)
    assert current_lr(later) == seen[7] and later.state_dict()["last_epoch"] == 7
    assert advance(later) == seen[8]


def test_stretched_schedule_continues_without_a_jump():
    cfg = OptimConfig(lr=0.1)
    seg = [{"epoch": 2, "progress": 0.5}]  # a 4-epoch run resumed after 2 epochs with 8
    f = epoch_factor(cfg, epochs=8, steps_per_epoch=1, segments=seg)
    assert f(2) == 0.5 * (1.0 + math.cos(math.pi * 0.5))
    values = [f(s) for s in range(2, 9)]
    assert all(b < a for a, b in zip(values, values[1:])) and values[-1] == 0.0


def test_self_retrospection_phase_schedule_is_the_reference_cosine():
    sr = SelfRetrospection(SelfRetrospectionConfig(lr=5e-4, phase=0.1))
    rounds = 50
    start = sr.phase_start(rounds)
    span = rounds - start
    expected = [5e-4 * 0.5 * (1.0 + math.cos(math.pi * (r - start) / span)) for r in range(start, rounds)]
    assert [sr.phase_lr(r, rounds) for r in range(start, rounds)] == expected
    opt = _opt(OptimConfig(lr=0.1))
    seen = []
    for r in range(start, rounds):
        sr._apply_lr(opt, r, rounds)
        seen.append(opt.param_groups[0]["lr"])
        opt.param_groups[0]["lr"] = 0.123  # the loop's own schedule sets the rate between rounds
    assert seen == expected


def test_one_optimizer_builder_for_every_job():
    adam = _opt(OptimConfig(name="adam", lr=1e-3, betas=[0.5, 0.99], weight_decay=0.0))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.5, 0.99)
    sgd = _opt(OptimConfig(nesterov=True, momentum=0.0))
    assert isinstance(sgd, torch.optim.SGD) and not sgd.defaults["nesterov"]
    with pytest.raises(KDGuardError, match="unknown optimizer"):
        _opt(OptimConfig(name="rmsprop"))
    with pytest.raises(KDGuardError, match="must be > 0"):
        _opt(OptimConfig(lr=0.0))
