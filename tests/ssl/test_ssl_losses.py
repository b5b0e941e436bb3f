"""NT-Xent, BadEncoder's loss terms and the six stage losses, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from kdguard.errors import KDGuardError
from kdguard.losses.attention import attention_loss
from kdguard.ssl.badencoder import badencoder_terms
from kdguard.ssl.simclr import nt_xent
from kdguard.ssl.stage_losses import LOSSES, StageLoss, default_stage_weights, feature_kd_loss


def test_nt_xent_closed_form_on_orthogonal_pairs():
    # views: a1 = a2 = e1, b1 = b2 = e2. For every anchor the positive has sim 1, the two negatives 0:
    # ℓ = −log(e^{1/τ} / (e^{1/τ} + 2)) with τ = 0.5.
    z = torch.eye(2)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_matches_a_loop_over_anchors():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    tau = 0.3
    views = [v / v.norm() for v in torch.cat([z1, z2])]
    total = 0.0
    for i in range(6):
        j = (i + 3) % 6
        num = math.exp(float(views[i] @ views[j]) / tau)
        den = sum(math.exp(float(views[i] @ views[k]) / tau) for k in range(6) if k != i)
        total += -math.log(num / den)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / 6, rel=1e-5)
    # scale-invariant (projections are normalised) and symmetric in the two views
    assert nt_xent(5 * z1, z2, tau).item() == pytest.approx(total / 6, rel=1e-5)
    assert nt_xent(z2, z1, tau).item() == pytest.approx(total / 6, rel=1e-5)


@pytest.mark.parametrize("z1, z2, tau", [(torch.ones(2, 3), torch.ones(3, 3), 0.5),
                                          (torch.ones(2, 3), torch.ones(2, 3), 0.0)])
def test_nt_xent_rejects_bad_input(z1, z2, tau):
    with pytest.raises(KDGuardError):
        nt_xent(z1, z2, tau)


def test_badencoder_terms_by_hand():
    s = 1 / math.sqrt(2)
    feat = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feat_clean = torch.tensor([[2.0, 0.0], [1.0, 0.0]])          # cos = 1, 0 → L2 = −0.5
    bd_a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    ref_a = torch.tensor([[1.0, 1.0]])                           # cos = s, s → −s
    bd_b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    ref_b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])               # cos = (1 + 0 + 1 + 0)/4 → −0.5
    seen = [torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])]
    clean_refs = [torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]  # 1 | (1 + s)/2
    terms = badencoder_terms(feat, feat_clean, [bd_a, bd_b], [ref_a, ref_b], seen, clean_refs)
    assert terms["l0"].item() == pytest.approx(-(s + 0.5) / 2, rel=1e-6)
    assert terms["l1"].item() == pytest.approx(-(1 + (1 + s) / 2) / 2, rel=1e-6)
    assert terms["l2"].item() == pytest.approx(-0.5, rel=1e-6)


def test_badencoder_terms_reach_minus_one_when_perfect_and_check_pairs():
    f = torch.randn(4, 8)
    ref = f[:1]
    terms = badencoder_terms(f, f, [ref.expand(4, 8)], [ref], [ref], [ref])
    assert all(v.item() == pytest.approx(-1.0, abs=1e-6) for v in terms.values())
    with pytest.raises(KDGuardError):
        badencoder_terms(f, f, [f], [ref, ref], [ref], [ref])
    with pytest.raises(KDGuardError):
        badencoder_terms(f, f[:2], [f], [ref], [ref], [ref])


def test_feature_kd_is_channel_softmax_kl_times_tau_squared():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    tau = 0.5
    total = 0.0
    for n in range(2):
        for h in range(2):
            for w in range(2):
                p = torch.softmax(ft[n, :, h, w] / tau, 0)
                q = torch.softmax(fs[n, :, h, w] / tau, 0)
                total += float((p * (p.log() - q.log())).sum())
    assert feature_kd_loss(fs, ft, tau).item() == pytest.approx(tau ** 2 * total / 2, rel=1e-5)
    assert feature_kd_loss(ft, ft, tau).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(KDGuardError):
        feature_kd_loss(fs, ft[:, :2], tau)


SHAPES = [(4, 8, 8), (8, 4, 4)]


@pytest.mark.parametrize("loss", ["at", "afd", "fitnet", "cc", "kd", "sp"])
def test_each_stage_loss_is_zero_on_equal_maps_and_positive_otherwise(loss):
    torch.manual_seed(0)
    feats = [torch.randn(3, *s).relu() for s in SHAPES]
    other = [torch.randn(3, *s).relu() for s in SHAPES]
    stage = StageLoss(loss, SHAPES, SHAPES, [1.0, 1.0])
    assert stage(feats, feats).item() == pytest.approx(0.0, abs=1e-6)
    assert stage(feats, other).item() > 1e-4


def test_stage_loss_weights_and_variants():
    torch.manual_seed(0)
    fs = [torch.randn(2, *s) for s in SHAPES]
    ft = [torch.randn(2, *s) for s in SHAPES]
    only_first = StageLoss("at", SHAPES, SHAPES, [2.0, 0.0])(fs, ft)
    expected = 2.0 * attention_loss(fs[0], ft[0], variant="nad")  # paper 1's map is the default
    assert only_first.item() == pytest.approx(expected.item(), rel=1e-6)
    assert default_stage_weights("kd", 4) == [1000.0, 0.0, 0.0, 0.0]   # paper 1: layer1 only
    assert default_stage_weights("at", 3) == [1000.0] * 3
    assert set(LOSSES.names()) == {"at", "afd", "fitnet", "cc", "kd", "sp"}
    corr = StageLoss("cc", SHAPES, SHAPES, [1.0, 1.0], {"variant": "correlation"})(fs, ft)
    kern = StageLoss("cc", SHAPES, SHAPES, [1.0, 1.0])(fs, ft)
    assert corr.item() != pytest.approx(kern.item())


@pytest.mark.parametrize("args, fragment", [
    (("at", SHAPES, SHAPES, [1.0]), "stage weights"),
    (("at", SHAPES, SHAPES, [1.0, -1.0]), "stage weights"),
    (("fitnet", SHAPES, [(4, 8, 8), (16, 4, 4)], [1.0, 1.0]), "equal student and teacher"),
    (("at", SHAPES, SHAPES[:1], [1.0]), "stages"),
    (("mse", SHAPES, SHAPES, [1.0, 1.0]), "unknown SSL distillation loss"),
])
def test_stage_loss_errors(args, fragment):
    with pytest.raises(KDGuardError, match=fragment):
        StageLoss(*args)


def test_stage_loss_rejects_unknown_options_and_variants():
    with pytest.raises(KDGuardError, match="unknown option"):
        StageLoss("at", SHAPES, SHAPES, [1.0, 1.0], {"beta": 3})
    with pytest.raises(KDGuardError, match="variant"):
        StageLoss("cc", SHAPES, SHAPES, [1.0, 1.0], {"variant": "rbf"})
