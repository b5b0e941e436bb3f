"""ABD plugged into the data-free loop: what each mode installs, and resume with ABD state."""

from __future__ import annotations

import warnings

import pytest
import torch

from kdguard.abd import SelfRetrospection, ShufflingVaccine, VaccineWeighting, build_abd
from kdguard.datafree import DataFreeLoop, build_method
from kdguard.datafree.config import ABDConfig


def _abd(kit, mode, method="zskt", **sv):
    cfg = ABDConfig(mode=mode)
    for k, v in sv.items():
        setattr(cfg.sv, k, v)
    cfg.sr.phase, cfg.sr.min_count = 0.5, 2
    with warnings.catch_warnings():  # SmallNet has two convolutions, fewer than 5
        warnings.simplefilter("ignore")
        return build_abd(cfg, teacher=kit.make_teacher(), image_shape=kit.SHAPE,
                         device=torch.device("cpu"), method=method)


def test_each_mode_installs_its_parts(kit):
    assert build_abd(ABDConfig(mode="off"), teacher=kit.make_teacher(), image_shape=kit.SHAPE,
                     device=torch.device("cpu"), method="zskt") is None
    sv = _abd(kit, "sv")
    assert isinstance(sv.extensions.generator_regularizers[0], ShufflingVaccine)
    assert sv.extensions.student_step is None and sv.extensions.sample_weighting is None
    ood = _abd(kit, "sv", method="ood")
    assert isinstance(ood.extensions.sample_weighting, VaccineWeighting)
    assert not ood.extensions.generator_regularizers
    sr = _abd(kit, "sr")
    assert isinstance(sr.extensions.student_step, SelfRetrospection) and sr.vaccine is None
    full = _abd(kit, "full")
    assert full.vaccine is not None and full.retrospection is not None
    assert set(full.summary()) == {"sv", "sr"}


def _build(kit, method, run_dir, rounds=4):
    teacher, student = kit.make_teacher(), kit.make_student()
    job = kit.tiny_job(method, monitor={"every": 1, "checkpoint_every": 1})
    job.abd.mode = "full"
    job.abd.sv.verify_batches, job.abd.sv.verify_skip = 3, 1  # verification happens mid-run
    job.abd.sr.phase, job.abd.sr.min_count = 0.5, 2
    torch.manual_seed(123)
    parts = build_method(job, kit.make_context(teacher, student))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        abd = build_abd(job.abd, teacher=teacher, image_shape=kit.SHAPE, device=torch.device("cpu"),
                        method=method, seed=5)
    loop = DataFreeLoop(parts.synthesizer, student, teacher, parts.objective, rounds=rounds,
                        student_steps=parts.student_steps, batch_size=job.schedule.batch_size,
                        optim=job.student_optim, device=torch.device("cpu"), run_dir=run_dir,
                        monitor=job.monitor, progress=False, extensions=abd.extensions)
    return loop, student, abd


@pytest.mark.parametrize("method", ["zskt", "ood"])
def test_resume_with_abd_state_reproduces_the_uninterrupted_run(kit, tmp_path, method):
    straight, s_straight, abd_straight = _build(kit, method, tmp_path / "straight")
    straight.run()
    first, _, abd_first = _build(kit, method, tmp_path / "resumed")
    first.run(stop_after=1)
    assert abd_first.vaccine.status == "pending"  # stopped while the vaccine was still watching
    second, s_resumed, abd_resumed = _build(kit, method, tmp_path / "resumed")
    second.run()
    for (k, a), b in zip(s_straight.state_dict().items(), s_resumed.state_dict().values()):
        assert torch.equal(a, b), f"{method}: student {k} differs after resuming"
    assert abd_resumed.summary() == abd_straight.summary()
    assert abd_resumed.vaccine.status in ("active", "off") and abd_resumed.vaccine.trials
    assert abd_resumed.retrospection.steps > 0
