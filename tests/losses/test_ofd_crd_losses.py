"""OFD margin (closed form vs Monte Carlo), the partial-L2 masking rule, and CRD's NCE loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdguard.errors import KDGuardError
from kdguard.losses import contrast_scores, crd_nce_loss, ofd_margin, ofd_partial_l2


@pytest.mark.parametrize("beta,gamma", [(0.5, 1.0), (-1.0, 2.0), (1.5, 0.8), (0.0, 0.3), (2.0, -1.0)])
def test_ofd_margin_matches_monte_carlo(beta, gamma):
    rng = np.random.default_rng(0)
    t = rng.normal(beta, abs(gamma), size=1_000_000)
    mc = t[t < 0].mean()
    m = ofd_margin(torch.tensor([gamma]), torch.tensor([beta]))
    assert m.shape == (1,) and m.dtype == torch.float32
    assert m.item() == pytest.approx(mc, abs=5e-3 * abs(gamma) + 1e-3)
    assert m.item() < 0


def test_ofd_margin_fallback_where_almost_no_negative_mass():
    # Φ(-β/γ) = Φ(-4) ≈ 3e-5 <= 0.001: the reference code uses -3γ (entries 0 and 2)
    m = ofd_margin(torch.tensor([1.0, 0.5, 2.0]), torch.tensor([4.0, 0.0, 8.0]))
    assert m[0].item() == pytest.approx(-3.0)
    assert m[2].item() == pytest.approx(-6.0)
    assert m[1].item() == pytest.approx(-0.5 * np.sqrt(2 / np.pi), rel=1e-5)  # half-normal mean
    # γ = 0: the limits (β if β < 0, else 0), no NaN
    z = ofd_margin(torch.tensor([0.0, 0.0]), torch.tensor([-0.7, 0.7]))
    assert torch.isfinite(z).all()
    assert z[0].item() == pytest.approx(-0.7) and z[1].item() == pytest.approx(0.0)
    with pytest.raises(KDGuardError, match="BN weight"):
        ofd_margin(torch.ones(3), torch.ones(2))


def test_partial_l2_masking_rule_by_hand():
    # one channel, margin -1; columns: (s, t) chosen to hit every case of Eq. 3-4
    s = torch.tensor([-2.0, -0.5, -0.2, 0.3, 1.0, -3.0, 0.5]).view(1, 1, 1, 7)
    t = torch.tensor([-0.5, -0.5, -0.8, -0.1, 2.0, -5.0, -5.0]).view(1, 1, 1, 7)
    margin = torch.tensor([-1.0])
    # target max(t, m):   -0.5  -0.5  -0.8  -0.1  2.0  -1.0  -1.0
    # kept (s > t' or t' > 0): no    no    yes   yes   yes  no    yes
    want = [0.0, 0.0, 0.6 ** 2, 0.4 ** 2, 1.0, 0.0, 1.5 ** 2]
    got = ofd_partial_l2(s, t, margin, reduction="none").flatten()
    torch.testing.assert_close(got, torch.tensor(want))
    assert ofd_partial_l2(s, t, margin).item() == pytest.approx(sum(want))
    assert ofd_partial_l2(s, t, margin, reduction="mean").item() == pytest.approx(sum(want) / 7)
    # without a margin the raw teacher value is the target: s = -3 > t = -5 is now penalised
    no_margin = ofd_partial_l2(s, t, None, reduction="none").flatten()
    assert no_margin[5].item() == pytest.approx(2.0 ** 2) and no_margin[6].item() == pytest.approx(5.5 ** 2)
    assert no_margin[0].item() == 0.0


def test_partial_l2_zero_when_student_equals_clipped_teacher():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, 4, generator=g)
    m = torch.tensor([-0.5, -1.0, -0.2])
    s = torch.maximum(t, m.view(1, 3, 1, 1))
    assert ofd_partial_l2(s, t, m).item() == 0.0
    assert ofd_partial_l2(s - 0.1 * (s <= 0), t, m).item() == 0.0  # below non-positive targets: free
    assert ofd_partial_l2(s + 0.1, t, m).item() > 0
    with pytest.raises(KDGuardError, match="margin"):
        ofd_partial_l2(s, t, m[:2])


def test_crd_nce_loss_golden():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64) * 0.01 + 1e-4
    n_data, k = 40, 4
    pn = k / n_data
    xn = x.numpy()
    want = -(np.log(xn[:, 0] / (xn[:, 0] + pn + 1e-7)).sum()
             + np.log(pn / (xn[:, 1:] + pn + 1e-7)).sum()) / 3
    assert crd_nce_loss(x, n_data).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(KDGuardError, match="negative"):
        crd_nce_loss(x[:, :1], n_data)


def test_contrast_scores_golden():
    g = torch.Generator().manual_seed(2)
    anchor = torch.nn.functional.normalize(torch.randn(2, 4, generator=g), dim=1)
    rows = torch.nn.functional.normalize(torch.randn(2, 3, 4, generator=g), dim=2)
    want = np.exp(np.einsum("bkd,bd->bk", rows.numpy(), anchor.numpy()) / 0.07)
    np.testing.assert_allclose(contrast_scores(anchor, rows, 0.07).numpy(), want, rtol=1e-5)
