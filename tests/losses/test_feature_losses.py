"""Feature-map losses (FitNet, AT and its variants, SP, NST, AFD) against independent NumPy code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdguard.errors import KDGuardError
from kdguard.losses import (AT_VARIANTS, afd_loss, at_nad, at_paper, at_zagoruyko, attention_loss,
                            attention_map, hint_loss, normalize_channel_attention, nst_loss, sp_loss)


def _feats(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# -- FitNet --------------------------------------------------------------------------------------

def test_hint_loss_reductions_golden():
    s, t = _feats(2, 3, 4, 4, seed=1), _feats(2, 3, 4, 4, seed=2)
    sq = (s.numpy() - t.numpy()) ** 2
    assert hint_loss(s, t).item() == pytest.approx(sq.mean(), rel=1e-6)
    assert hint_loss(s, t, reduction="batchmean").item() == pytest.approx(sq.sum() / 2, rel=1e-6)
    assert hint_loss(s, t, reduction="sum").item() == pytest.approx(sq.sum(), rel=1e-6)
    assert hint_loss(t, t).item() == 0.0


def test_hint_loss_shape_mismatch_is_a_clear_error():
    with pytest.raises(KDGuardError, match="connector"):
        hint_loss(_feats(2, 3, 4, 4), _feats(2, 5, 4, 4))


# -- attention transfer --------------------------------------------------------------------------

def _np_zagoruyko(x, p=2):  # szagoruyko/attention-transfer: normalize(x.pow(p).mean(1).view(n, -1))
    q = (x ** p).mean(axis=1).reshape(len(x), -1)
    return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def _np_nad(x, p=2):  # KD-Zoo / NAD: am = sum_c |x|^p; am / (||am||_F + 1e-6)
    am = (np.abs(x) ** p).sum(axis=1)
    norm = np.sqrt((am ** 2).sum(axis=(1, 2), keepdims=True))
    return (am / (norm + 1e-6)).reshape(len(x), -1)


def _np_paper(x):  # Eq. 2 with p = 2: sum of squares, L2-normalised, ||.||_2 distance
    q = (x ** 2).sum(axis=1).reshape(len(x), -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_attention_variants_match_their_reference_formulas():
    s, t = _feats(3, 4, 5, 5, seed=3), _feats(3, 6, 5, 5, seed=4)  # channel counts may differ
    sn, tn = s.numpy(), t.numpy()
    want_zag = np.mean((_np_zagoruyko(sn) - _np_zagoruyko(tn)) ** 2)
    want_nad = np.mean((_np_nad(sn) - _np_nad(tn)) ** 2)
    want_paper = np.mean(np.linalg.norm(_np_paper(sn) - _np_paper(tn), axis=1))
    assert attention_loss(s, t, variant="zagoruyko").item() == pytest.approx(want_zag, rel=1e-5)
    assert attention_loss(s, t, variant="nad").item() == pytest.approx(want_nad, rel=1e-5)
    assert attention_loss(s, t, variant="paper").item() == pytest.approx(want_paper, rel=1e-5)
    np.testing.assert_allclose(at_zagoruyko(s).numpy(), _np_zagoruyko(sn), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(at_nad(s).numpy(), _np_nad(sn), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(at_paper(s).numpy(), _np_paper(sn), rtol=1e-5, atol=1e-7)


def test_attention_variants_differ_as_documented():
    s, t = _feats(1, 4, 6, 6, seed=5), _feats(1, 4, 6, 6, seed=6)
    zag = attention_loss(s, t, variant="zagoruyko").item()
    nad = attention_loss(s, t, variant="nad").item()
    paper = attention_loss(s, t, variant="paper").item()
    # mean vs sum over channels and L2 vs Frobenius cancel in the normalisation: only eps differs
    assert nad == pytest.approx(zag, rel=1e-4)
    # the paper's distance is the unsquared L2 norm, not a mean over H*W: paper^2 = zag * H * W
    assert paper ** 2 == pytest.approx(zag * 36, rel=1e-4)
    assert paper > 10 * zag
    # for odd p on signed features, Zagoruyko's code (no abs) and NAD (abs) genuinely differ
    assert attention_loss(s, t, variant="zagoruyko", p=3).item() != pytest.approx(
        attention_loss(s, t, variant="nad", p=3).item(), rel=1e-2)
    # ... and agree on non-negative (post-ReLU) features
    sr, tr = s.relu(), t.relu()
    assert attention_loss(sr, tr, variant="zagoruyko", p=3).item() == pytest.approx(
        attention_loss(sr, tr, variant="nad", p=3).item(), rel=1e-4)
    assert set(AT_VARIANTS) == {"zagoruyko", "nad", "paper"}


def test_attention_loss_zero_for_equal_features_and_scale_invariant():
    t = _feats(2, 3, 4, 4, seed=7)
    for v in AT_VARIANTS:
        assert attention_loss(t, t, variant=v).item() == pytest.approx(0.0, abs=1e-12)
        # normalised maps ignore a global scale of the features
        assert attention_loss(5.0 * t, t, variant=v).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_loss_pools_the_larger_map():
    s, t = _feats(2, 3, 8, 8, seed=8), _feats(2, 5, 4, 4, seed=9)
    want = attention_loss(F.adaptive_avg_pool2d(s, 4), t)
    assert attention_loss(s, t).item() == pytest.approx(want.item(), rel=1e-6)
    assert attention_loss(t, s).item() == pytest.approx(attention_loss(t, F.adaptive_avg_pool2d(s, 4)).item())


def test_attention_map_options_and_errors():
    x = _feats(2, 3, 4, 4, seed=10)
    q = attention_map(x, reduce="sum", normalize="none")
    np.testing.assert_allclose(q.numpy(), (x.numpy() ** 2).sum(1).reshape(2, -1), rtol=1e-5)
    assert torch.allclose(attention_map(x).norm(dim=1), torch.ones(2))
    with pytest.raises(KDGuardError, match="variant"):
        attention_loss(x, x, variant="bogus")
    with pytest.raises(KDGuardError, match="4-D"):
        attention_map(x.flatten(1))
    with pytest.raises(KDGuardError, match="p="):
        attention_map(x, p=0)
    with pytest.raises(KDGuardError, match="integer p"):
        attention_loss(x, x, variant="zagoruyko", p=1.5)
    assert torch.isfinite(attention_loss(x, x + 1, variant="nad", p=1.5))
    with pytest.raises(KDGuardError, match="batch"):
        attention_loss(x, x[:1])


# -- similarity preserving -----------------------------------------------------------------------

def test_sp_loss_golden_and_identity():
    s, t = _feats(4, 3, 2, 2, seed=11), _feats(4, 7, 3, 3, seed=12)

    def g(x):
        q = x.reshape(len(x), -1)
        m = q @ q.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    want = ((g(s.numpy()) - g(t.numpy())) ** 2).sum() / 16
    assert sp_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    assert sp_loss(t, t).item() == pytest.approx(0.0, abs=1e-12)


# -- NST -----------------------------------------------------------------------------------------

def _np_mmd2(s, t):
    total = 0.0
    for n in range(len(s)):
        a = s[n].reshape(s.shape[1], -1)
        b = t[n].reshape(t.shape[1], -1)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        k = lambda u, v: np.mean([(ui @ vj) ** 2 for ui in u for vj in v])  # noqa: E731
        total += k(a, a) + k(b, b) - 2 * k(a, b)
    return total / len(s)


def test_nst_loss_golden_identity_and_pooling():
    s, t = _feats(2, 3, 4, 4, seed=13), _feats(2, 5, 4, 4, seed=14)
    assert nst_loss(s, t).item() == pytest.approx(_np_mmd2(s.numpy(), t.numpy()), rel=1e-5)
    assert nst_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert nst_loss(s, t).item() > 0
    # without the teacher-teacher term the value shifts by a student-independent constant
    diff = nst_loss(s, t).item() - nst_loss(s, t, full=False).item()
    diff2 = nst_loss(2 * s + 1, t).item() - nst_loss(2 * s + 1, t, full=False).item()
    assert diff == pytest.approx(diff2, rel=1e-6)
    big = _feats(2, 3, 8, 8, seed=15)
    pooled = nst_loss(F.adaptive_avg_pool2d(big, 4), t)
    assert nst_loss(big, t).item() == pytest.approx(pooled.item(), rel=1e-6)


# -- AFD -----------------------------------------------------------------------------------------

def test_afd_loss_golden_and_identity():
    s, t = _feats(2, 3, 4, 4, seed=16), _feats(2, 3, 4, 4, seed=17)
    logits = _feats(2, 3, seed=18)
    rho = normalize_channel_attention(logits)
    r = 1 / (1 + np.exp(-logits.numpy()))
    r = r / r.sum(1, keepdims=True)
    np.testing.assert_allclose(rho.numpy(), r, rtol=1e-6)
    assert torch.allclose(rho.sum(1), torch.ones(2, dtype=rho.dtype))

    def norm(x):
        return x / (np.sqrt((x ** 2).sum(axis=(2, 3), keepdims=True)) + 1e-6)

    per_channel = ((norm(s.numpy()) - norm(t.numpy())) ** 2).mean(axis=(2, 3))
    want = (r * per_channel).sum(1).mean()
    assert afd_loss(s, t, rho).item() == pytest.approx(want, rel=1e-5)
    assert afd_loss(t, t, rho).item() == 0.0
    with pytest.raises(KDGuardError, match="attention"):
        afd_loss(s, t, rho[:, :2])
