"""Relational losses on embeddings (RKD, PKT, CC, Correlation) against independent NumPy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdguard.errors import KDGuardError
from kdguard.losses import (cc_loss, correlation_loss, correlation_matrix, pairwise_distances, pkt_loss,
                            rkd_angle_loss, rkd_distance_loss, rkd_loss)


def _emb(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _huber(x):
    a = np.abs(x)
    return np.where(a < 1, 0.5 * x * x, a - 0.5)


# -- RKD -----------------------------------------------------------------------------------------

def _np_dist(e):
    n = len(e)
    d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
    return d / (d.sum() / (n * (n - 1)))


def _np_angles(e):
    n = len(e)
    out = np.zeros((n, n, n))
    for j in range(n):
        for i in range(n):
            for k in range(n):
                if i == j or k == j:
                    continue
                a, b = e[i] - e[j], e[k] - e[j]
                out[j, i, k] = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return out


def test_rkd_distance_and_angle_golden():
    s, t = _emb(5, 3, 1), _emb(5, 6, 2) * 4  # dimensions may differ; scale is normalised away
    want_d = _huber(_np_dist(s.numpy()) - _np_dist(t.numpy()))
    want_a = _huber(_np_angles(s.numpy()) - _np_angles(t.numpy()))
    assert rkd_distance_loss(s, t).item() == pytest.approx(want_d.mean(), rel=1e-5)
    assert rkd_distance_loss(s, t, reduction="sum").item() == pytest.approx(want_d.sum(), rel=1e-5)
    assert rkd_angle_loss(s, t).item() == pytest.approx(want_a.mean(), rel=1e-5)
    assert rkd_loss(s, t).item() == pytest.approx(25 * want_d.mean() + 50 * want_a.mean(), rel=1e-5)


def test_rkd_zero_for_equal_and_scaled_embeddings():
    t = _emb(6, 4, 3)
    assert rkd_loss(t, t).item() == pytest.approx(0.0, abs=1e-9)
    # both relations are invariant to a global scale and a translation of the embedding
    assert rkd_loss(3 * t + 1, t).item() == pytest.approx(0.0, abs=1e-6)


def test_pairwise_distances_and_gradients_with_duplicates():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0]], requires_grad=True)
    d = pairwise_distances(e)
    assert d[0, 1].item() == pytest.approx(5.0) and d[0, 0].item() == 0.0
    rkd_loss(e, torch.randn(3, 2)).backward()  # coincident points must not give NaN gradients
    assert torch.isfinite(e.grad).all()


def test_rkd_needs_enough_samples():
    with pytest.raises(KDGuardError, match="at least 3"):
        rkd_angle_loss(_emb(2, 3, 0), _emb(2, 3, 1))


# -- PKT -----------------------------------------------------------------------------------------

def _np_cond(e, eps=1e-7):
    e = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
    k = (e @ e.T + 1) / 2
    return k / k.sum(axis=1, keepdims=True)


def test_pkt_golden_and_identity():
    s, t = _emb(4, 3, 4), _emb(4, 5, 5)
    ps, pt = _np_cond(s.numpy()), _np_cond(t.numpy())
    terms = pt * np.log((pt + 1e-7) / (ps + 1e-7))
    assert pkt_loss(s, t).item() == pytest.approx(terms.mean(), rel=1e-5)
    assert pkt_loss(s, t, reduction="sum").item() == pytest.approx(terms.sum(), rel=1e-5)
    assert pkt_loss(s, t, reduction="batchmean").item() == pytest.approx(terms.sum() / 4, rel=1e-5)
    assert pkt_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)


# -- CC ------------------------------------------------------------------------------------------

def _np_cc_matrix(e, gamma, order):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    n = len(e)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            x = e[i] @ e[j]
            out[i, j] = math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * x ** p
                                                   for p in range(order + 1))
    return out


def test_cc_taylor_golden_and_identity():
    s, t = _emb(5, 3, 6), _emb(5, 8, 7)
    want = np.mean((_np_cc_matrix(s.numpy(), 0.4, 2) - _np_cc_matrix(t.numpy(), 0.4, 2)) ** 2)
    assert cc_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    assert cc_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)


def test_cc_taylor_converges_to_the_rbf_kernel():
    e = _emb(4, 3, 8)
    x = e / e.norm(dim=1, keepdim=True)
    rbf = torch.exp(-0.4 * torch.cdist(x, x) ** 2)
    torch.testing.assert_close(correlation_matrix(e, kernel="rbf"), rbf.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(correlation_matrix(e, order=12), rbf.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(correlation_matrix(e, order=1), rbf.float(), atol=1e-3)
    with pytest.raises(KDGuardError, match="kernel"):
        correlation_matrix(e, kernel="poly")


def test_repdistiller_correlation_golden_and_order_dependence():
    s, t = _emb(4, 3, 9), _emb(4, 3, 10)
    d = np.abs(s.numpy() - t.numpy())
    want = np.mean([(d[i] * d[i + 1]).sum() for i in range(3)])
    assert correlation_loss(s, t).item() == pytest.approx(want, rel=1e-6)
    assert correlation_loss(t, t).item() == 0.0
    perm = torch.tensor([2, 0, 3, 1])  # unlike the paper's CC, it depends on the batch order
    assert correlation_loss(s[perm], t[perm]).item() != pytest.approx(want, rel=1e-3)
    assert cc_loss(s[perm], t[perm]).item() == pytest.approx(cc_loss(s, t).item(), rel=1e-6)
    with pytest.raises(KDGuardError, match="same dimension"):
        correlation_loss(_emb(4, 3, 0), _emb(4, 5, 1))


# -- mixed precision -----------------------------------------------------------------------------

def test_losses_ignore_autocast():
    """Under autocast a matmul runs in bf16; the losses must still compute in float32."""
    from kdguard.losses import contrast_scores, nst_loss, sp_loss

    s, t = _emb(8, 16, 11).float(), _emb(8, 32, 12).float()
    fs, ft = s.view(8, 4, 2, 2), t.view(8, 8, 2, 2)
    rows = torch.nn.functional.normalize(_emb(8, 48, 13).float().view(8, 3, 16), dim=2)
    anchor = torch.nn.functional.normalize(s, dim=1)
    cases = [lambda: pkt_loss(s, t), lambda: rkd_loss(s, t), lambda: cc_loss(s, t),
             lambda: sp_loss(fs, ft), lambda: nst_loss(fs, ft), lambda: contrast_scores(anchor, rows, 0.07)]
    for case in cases:
        want = case()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = case()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
