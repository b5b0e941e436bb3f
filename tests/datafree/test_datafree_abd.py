"""ABD plugged into the data-free loop: what each mode installs, and resume with ABD state."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from kdguard.abd import ABDConfig, SelfRetrospection, ShufflingVaccine, VaccineWeighting, build_abd
from kdguard.datafree import DataFreeLoop, build_method


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


def _build(kit, method, run_dir, rounds=4, mode="full", every=1, verify_batches=3):
    teacher, student = kit.make_teacher(), kit.make_student()
    job = kit.tiny_job(method, monitor={"every": every, "checkpoint_every": 1})
    job.abd.mode = mode
    job.abd.sv.verify_batches, job.abd.sv.verify_skip = verify_batches, 1  # 3: verification happens mid-run
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
                        monitor=job.monitor, progress=False, extensions=abd and abd.extensions)
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
    # each log line says how much of its interval the vaccine flagged, the same after a resume
    logged = [r.defence for r in straight.history]
    assert logged and all(set(d) == {"sv_flagged_share"} for d in logged)
    assert [r.defence for r in second.history] == logged
    assert abd_resumed.retrospection.steps > 0


@pytest.mark.parametrize("method", ["zskt", "ood"])
def test_every_log_line_carries_the_share_the_active_vaccine_flagged(kit, tmp_path, method):
    loop, _, abd = _build(kit, method, tmp_path / "run", mode="sv", verify_batches=0)
    history = loop.run()
    shares = [r.defence["sv_flagged_share"] for r in history]
    assert len(shares) == 4 and all(s is not None and 0.0 <= s <= 1.0 for s in shares)
    seen = abd.vaccine.seen  # the intervals are equal, so the run's share is their mean
    assert sum(shares) / len(shares) == pytest.approx(abd.vaccine.flagged_share) and seen > 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["defence"]["sv_flagged_share"] for line in lines] == shares


@pytest.mark.parametrize("prefix_mode, mode", [("off", "sr"), ("sv", "full")])
def test_sr_run_forked_at_the_phase_start_equals_the_run_from_scratch(kit, tmp_path, prefix_mode, mode):
    """SR changes nothing before its phase, so a run without SR stopped at the phase start and
    continued with SR is the SR run itself: the ABD table's seed-0 SR cells (``results/abd/``)
    were made by continuing their prefix."""
    straight, s_straight, _ = _build(kit, "zskt", tmp_path / "straight", mode=mode)
    straight.run()
    prefix, _, _ = _build(kit, "zskt", tmp_path / "prefix", mode=prefix_mode)
    prefix.run(stop_after=2)  # phase 0.5 of 4 rounds: SR runs rounds 3 and 4
    shutil.copytree(tmp_path / "prefix", tmp_path / "forked")
    forked, s_forked, abd_forked = _build(kit, "zskt", tmp_path / "forked", mode=mode)
    forked.run()
    assert abd_forked.retrospection.steps > 0
    for (k, a), b in zip(s_straight.state_dict().items(), s_forked.state_dict().values()):
        assert torch.equal(a, b), f"{prefix_mode} → {mode}: student {k} differs from the run from scratch"


def test_a_stop_between_log_records_keeps_its_seconds(kit, tmp_path, monkeypatch):
    """Rounds done before a checkpoint that is not a log record are not redone after resuming,
    so their time is carried in the checkpoint and counted in the next record."""
    clock = iter(range(0, 10_000, 10))  # each perf_counter() call advances 10 s
    monkeypatch.setattr("kdguard.datafree.loop.time.perf_counter", lambda: float(next(clock)))
    first, _, _ = _build(kit, "zskt", tmp_path / "run", mode="off", every=4)
    first.run(stop_after=3)  # checkpointed at round 3, no record yet (records every 4 rounds)
    assert first.history == []
    second, _, _ = _build(kit, "zskt", tmp_path / "run", mode="off", every=4)
    second.run()
    (record,) = second.history
    assert record.round == 4
    assert record.seconds > 10  # more than the one round run after resuming
