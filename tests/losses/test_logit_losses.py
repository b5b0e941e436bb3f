"""DKD: golden values against an independent NumPy implementation, and the paper's decomposition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdguard.errors import KDGuardError
from kdguard.losses import dkd_loss, dkd_parts, kl_divergence


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_dkd_parts(s: np.ndarray, t: np.ndarray, y: np.ndarray, tau: float):
    ps, pt = _softmax(s / tau), _softmax(t / tau)
    tckd, nckd = [], []
    for i, c in enumerate(y):
        bs = np.array([ps[i, c], 1 - ps[i, c]])
        bt = np.array([pt[i, c], 1 - pt[i, c]])
        tckd.append(np.sum(bt * np.log(bt / bs)))
        keep = np.arange(s.shape[1]) != c
        qs = ps[i, keep] / ps[i, keep].sum()
        qt = pt[i, keep] / pt[i, keep].sum()
        nckd.append(np.sum(qt * np.log(qt / qs)))
    return np.array(tckd), np.array(nckd)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 6, 2, 3])
    return s, t, y


def test_dkd_matches_numpy_golden(logits):
    s, t, y = logits
    tc, nc = _np_dkd_parts(s.numpy(), t.numpy(), y.numpy(), 4.0)
    want = 16.0 * np.mean(1.0 * tc + 8.0 * nc)
    got = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got_tc, got_nc = dkd_parts(s, t, y, temperature=4.0)
    np.testing.assert_allclose(got_tc.numpy(), tc, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_nc.numpy(), nc, rtol=1e-4, atol=1e-7)


def test_kd_equals_tckd_plus_weighted_nckd_per_sample(logits):
    # Zhao et al. 2022, Eq. 7: KL(p^T || p^S) = TCKD + (1 - p^T_t) NCKD
    s, t, y = logits
    tau = 2.0
    tc, nc = dkd_parts(s, t, y, temperature=tau)
    pt_target = torch.softmax(t / tau, dim=1).gather(1, y[:, None]).squeeze(1)
    kl = kl_divergence(t, s, temperature=tau, reduction="none")
    torch.testing.assert_close(kl, (tc + (1 - pt_target) * nc).float(), rtol=1e-5, atol=1e-6)


def test_dkd_reductions_and_weights(logits):
    s, t, y = logits
    per = dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=3.0, reduction="none")
    assert per.shape == (5,)
    total = dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=3.0, reduction="sum")
    assert total.item() == pytest.approx(per.sum().item())
    assert dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=3.0).item() == pytest.approx(per.mean().item())
    tc, nc = dkd_parts(s, t, y, temperature=3.0)
    torch.testing.assert_close(per, 9.0 * (0.5 * tc + 2.0 * nc))


def test_dkd_zero_for_identical_logits_and_gradient_only_to_student(logits):
    s, t, y = logits
    assert dkd_loss(t, t, y).item() == pytest.approx(0.0, abs=1e-9)
    s = s.clone().requires_grad_(True)
    dkd_loss(s, t, y).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dkd_stable_for_extreme_logits():
    s = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-60.0, 60.0, 0.0]])
    loss = dkd_loss(s, t, torch.tensor([0]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_errors(logits):
    s, t, y = logits
    with pytest.raises(KDGuardError, match="labels"):
        dkd_loss(s, t, None)
    with pytest.raises(KDGuardError, match="labels"):
        dkd_loss(s, t, y[:3])
    with pytest.raises(KDGuardError, match="integer"):
        dkd_loss(s, t, y.float())
    with pytest.raises(KDGuardError, match="temperature"):
        dkd_loss(s, t, y, temperature=0)
    with pytest.raises(KDGuardError, match="reduction"):
        dkd_loss(s, t, y, reduction="mean")
    with pytest.raises(KDGuardError, match="logit shapes"):
        dkd_loss(s, t[:, :3], y)
