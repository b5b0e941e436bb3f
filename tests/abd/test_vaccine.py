"""The Shuffling Vaccine: suspicion mask, the regulariser's direction, OOD form, verification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdguard.abd import (
    ShuffledTeacher,
    ShufflingVaccine,
    VaccineWeighting,
    divergence_per_sample,
    tail_ratio,
)
from kdguard.errors import KDGuardError


def _vaccine(kit, seed=1, **kwargs):
    teacher = kit.ShortcutNet()
    shuffled = ShuffledTeacher(teacher, kit.clean_images(2), layers=1, ensemble=3,
                               generator=torch.Generator().manual_seed(seed))
    return teacher, ShufflingVaccine(teacher, shuffled, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_the_mask_flags_triggered_samples_of_a_shortcut_model(abd_kit):
    teacher, vaccine = _vaccine(abd_kit)
    clean = abd_kit.clean_images(256)
    bad = abd_kit.triggered(clean)
    assert (teacher(bad).argmax(1) == abd_kit.TARGET).all()  # the shortcut works
    assert vaccine.suspicion_mask(bad).all()
    assert vaccine.suspicion_mask(clean).float().mean() < 0.6
    # the divergence of triggered samples is far below that of clean ones
    d_clean = divergence_per_sample(teacher(clean), vaccine.shuffled_logits(clean))
    d_bad = divergence_per_sample(teacher(bad), vaccine.shuffled_logits(bad))
    assert d_bad.median() < 0.1 * d_clean.median()


def test_divergence_matches_numpy():
    t = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    s = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 2.0]])
    p = np.exp(t.numpy()) / np.exp(t.numpy()).sum(1, keepdims=True)
    q = np.exp(s.numpy()) / np.exp(s.numpy()).sum(1, keepdims=True)
    expected = (p * (np.log(p) - np.log(q))).sum(1) / 3
    assert np.allclose(divergence_per_sample(t, s).numpy(), expected, atol=1e-6)


def test_regulariser_step_increases_divergence_on_suspicious_samples(abd_kit):
    teacher, vaccine = _vaccine(abd_kit)
    x = abd_kit.triggered(abd_kit.clean_images(16)).requires_grad_(True)
    x_start = x.detach().clone()
    term = vaccine(x, teacher(x))["sv_maximize_divergence"]
    assert term.item() <= 0.0
    term.backward()
    with torch.no_grad():
        stepped = x_start - 0.05 * x.grad / x.grad.abs().max()  # a descent step on the term
        before = divergence_per_sample(teacher(x_start), vaccine.shuffled_logits(x_start)).mean()
        after = divergence_per_sample(teacher(stepped), vaccine.shuffled_logits(stepped)).mean()
    assert after > before


def test_regulariser_is_zero_when_nothing_is_suspicious_or_coef_is_zero(abd_kit):
    teacher, vaccine = _vaccine(abd_kit)
    x = abd_kit.clean_images(64)
    mask = vaccine.suspicion_mask(x)
    term = vaccine(x[~mask], teacher(x[~mask]))["sv_maximize_divergence"]
    assert term.item() == 0.0
    _, off = _vaccine(abd_kit, coef=0.0)
    assert off(x, teacher(x))["sv_maximize_divergence"].item() == 0.0


def test_the_flagged_rows_pass_gives_the_full_batch_value_and_gradient(abd_kit):
    """With gradients through T̃, SV flags rows without gradient and back-propagates through
    those rows only; value and input gradient equal the one-pass computation on the whole batch."""
    teacher, vaccine = _vaccine(abd_kit)
    clean = abd_kit.clean_images(24)
    x0 = torch.cat([clean[:16], abd_kit.triggered(clean[16:])])  # some flagged, some not
    share = vaccine.suspicion_mask(x0).float().mean()
    assert 0 < share < 1
    results = []
    for subset_max in (1.0, -1.0):  # 1: always the flagged-rows pass; -1: always the whole batch
        vaccine.SUBSET_MAX_SHARE = subset_max
        x = x0.clone().requires_grad_(True)
        term = vaccine(x, teacher(x))["sv_maximize_divergence"]
        term.backward()
        results.append((term.detach(), x.grad))
    (v_sub, g_sub), (v_full, g_full) = results
    assert v_sub < 0 and torch.allclose(v_sub, v_full, atol=1e-6)
    assert g_sub.abs().sum() > 0 and torch.allclose(g_sub, g_full, atol=1e-6)
    assert vaccine._last_share == pytest.approx(float(share))


def test_ood_form_keeps_kd_on_unsuspicious_and_pushes_away_on_suspicious(abd_kit):
    teacher, vaccine = _vaccine(abd_kit, coef=0.5)
    clean = abd_kit.clean_images(12)
    x = torch.cat([clean, abd_kit.triggered(clean[:4])])
    per = torch.arange(len(x), dtype=torch.float32, requires_grad=True)
    mask = vaccine.suspicion_mask(x)
    out = VaccineWeighting(vaccine)(per, x, teacher(x))
    assert torch.isclose(out["kd"], per[~mask].mean())
    assert torch.isclose(out["sv_push_away"], -0.5 * per[mask].mean())
    out["sv_push_away"].backward()
    assert (per.grad[mask] < 0).all() and (per.grad[~mask] == 0).all()


def test_tail_ratio_against_a_hand_count():
    values = torch.tensor([1.0] * 60 + [10.0] * 40 + [1e-9])
    s = np.log10(values.numpy())
    expected = np.mean(s < s.mean() - 3 * s.std())  # numpy's default ddof=0, as the reference
    assert tail_ratio(values) == pytest.approx(expected) and expected > 0


def test_verification_switches_on_when_triggered_samples_form_a_tail(abd_kit):
    teacher, vaccine = _vaccine(abd_kit, verify_batches=4, verify_skip=1)
    clean = abd_kit.clean_images(64)
    batch = torch.cat([clean[:60], abd_kit.triggered(clean[60:])])  # 4 of 64 carry the trigger
    assert vaccine.status == "pending"
    for _ in range(3):  # call 1 is skipped, calls 2-4 are cached, then the test runs
        out = vaccine(batch, teacher(batch))["sv_maximize_divergence"]
        assert out.item() == 0.0 and not out.requires_grad  # pending: the vaccine only watches
        assert vaccine.status == "pending"
    out = vaccine(batch, teacher(batch))["sv_maximize_divergence"]  # verified, then applied
    assert vaccine.status == "active" and vaccine.trials and vaccine.trials[-1] > 0.02
    assert out.item() < 0


def test_verification_gives_up_after_max_trials_on_a_clean_cache(abd_kit):
    teacher, vaccine = _vaccine(abd_kit, verify_batches=2, verify_skip=0, max_trials=3,
                                tail_threshold=0.1)
    x = abd_kit.clean_images(256)
    vaccine(x, teacher(x))
    vaccine(x, teacher(x))
    assert vaccine.status == "off" and len(vaccine.trials) == 3
    assert vaccine.summary()["tail_ratios"] == vaccine.trials


def test_state_round_trip_restores_shuffle_status_and_cache(abd_kit):
    teacher, a = _vaccine(abd_kit, seed=1, verify_batches=5, verify_skip=1)
    x = abd_kit.clean_images(8)
    for _ in range(3):
        a(x, teacher(x))
    _, b = _vaccine(abd_kit, seed=2, verify_batches=5, verify_skip=1)
    b.load_state_dict(a.state_dict())
    assert (b.status, b.calls, len(b._cache)) == ("pending", 3, 2)
    assert torch.equal(a.shuffled_logits(x), b.shuffled_logits(x))
    a(x, teacher(x)), b(x, teacher(x))
    a(x, teacher(x)), b(x, teacher(x))
    assert a.status == b.status and a.trials == b.trials


def test_bad_settings_are_refused(abd_kit):
    with pytest.raises(KDGuardError, match="coef"):
        _vaccine(abd_kit, coef=-1.0)
    with pytest.raises(KDGuardError, match="verify_batches"):
        _vaccine(abd_kit, verify_batches=3, verify_skip=5)


def test_flagged_share_counts_every_active_call_and_survives_a_checkpoint(abd_kit):
    teacher, a = _vaccine(abd_kit)
    clean = abd_kit.clean_images(24)
    x = torch.cat([clean[:16], abd_kit.triggered(clean[16:])])
    flagged = int(a.suspicion_mask(x).sum())
    assert 0 < flagged < len(x) and a.summary()["flagged_share"] is None
    a(x, teacher(x))                                  # generator form
    a.SUBSET_MAX_SHARE = -1.0
    a(x, teacher(x))                                  # its whole-batch pass counts the same
    a.sample_weighting(torch.ones(len(x)), x, teacher(x))  # student form
    assert a.seen == 3 * len(x) and a.flagged_share == pytest.approx(flagged / len(x))
    _, b = _vaccine(abd_kit, seed=2)
    b.load_state_dict(a.state_dict())
    more = int(b.suspicion_mask(clean[:16]).sum())
    assert more != flagged
    b(clean[:16], teacher(clean[:16]))
    assert b.summary()["flag_samples"] == 3 * len(x) + 16
    assert b.flagged_share == pytest.approx((3 * flagged + more) / (3 * len(x) + 16))


def test_a_pending_vaccine_counts_nothing(abd_kit):
    teacher, vaccine = _vaccine(abd_kit, verify_batches=5, verify_skip=1)
    x = abd_kit.clean_images(8)
    vaccine(x, teacher(x))
    assert vaccine.seen == 0 and vaccine.flagged_share is None


def test_interval_log_gives_each_interval_its_own_share_and_survives_a_checkpoint(abd_kit):
    teacher, a = _vaccine(abd_kit)
    clean = abd_kit.clean_images(24)
    x = torch.cat([clean[:16], abd_kit.triggered(clean[16:])])
    flagged, flagged_clean = int(a.suspicion_mask(x).sum()), int(a.suspicion_mask(clean[:16]).sum())
    assert flagged != flagged_clean * len(x) / 16  # the two intervals differ
    assert a.interval_log() == {"sv_flagged_share": None}  # nothing seen yet
    a(x, teacher(x))
    a(x, teacher(x))
    assert a.interval_log()["sv_flagged_share"] == pytest.approx(flagged / len(x))
    a(clean[:16], teacher(clean[:16]))
    _, b = _vaccine(abd_kit, seed=2)
    b.load_state_dict(a.state_dict())  # a checkpoint inside the interval
    assert b.interval_log()["sv_flagged_share"] == pytest.approx(flagged_clean / 16)
    assert b.interval_log() == {"sv_flagged_share": None}
    assert VaccineWeighting(b).interval_log() == {"sv_flagged_share": None}
