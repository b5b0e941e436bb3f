"""Terms: connectors, AFD attention training flag, OFD weighting/margins, CRD memory bank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdguard.distill.terms import (AFDTerm, Connector, ContrastMemory, CRDTerm, FitNetTerm, OFDTerm,
                                   teacher_margins)
from kdguard.errors import KDGuardError
from kdguard.losses import crd_nce_loss, ofd_margin, ofd_partial_l2

KW = dict(s_logits=torch.zeros(2, 3), t_logits=torch.zeros(2, 3), y=None)


def _maps(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_connector_maps_channels_and_space():
    c = Connector((4, 8, 8), (6, 4, 4))
    out = c(_maps(2, 4, 8, 8))
    assert out.shape == (2, 6, 4, 4)
    assert Connector((5,), (7,))(_maps(3, 5)).shape == (3, 7)
    with pytest.raises(KDGuardError, match="cannot connect"):
        Connector((4, 8, 8), (6,))


def test_fitnet_connector_auto_is_identity_for_equal_shapes():
    same = FitNetTerm([(4, 8, 8)], [(4, 8, 8)])
    assert isinstance(same.connectors[0], nn.Identity)
    t = _maps(2, 4, 8, 8)
    assert same([t.clone()], [t], **KW).item() == 0.0
    diff = FitNetTerm([(4, 8, 8)], [(6, 8, 8)])
    assert isinstance(diff.connectors[0], Connector)
    with pytest.raises(KDGuardError, match="connector"):
        FitNetTerm([(4, 8, 8)], [(6, 8, 8)], connector="none")([_maps(2, 4, 8, 8)], [_maps(2, 6, 8, 8)], **KW)


@pytest.mark.parametrize("train_attention", [True, False])
def test_afd_attention_training_flag(train_attention):
    term = AFDTerm([(4, 4, 4)], [(4, 4, 4)], train_attention=train_attention)
    s = _maps(2, 4, 4, 4, seed=1).requires_grad_(True)
    loss = term([s], [_maps(2, 4, 4, 4, seed=2)], **KW)
    loss.backward()
    assert s.grad is not None
    params = list(term.attention.parameters())
    assert all(p.requires_grad is train_attention for p in params)
    assert all((p.grad is not None) is train_attention for p in params)
    assert len(term.attention[0].mlp[0].weight) == 8  # att_f = 2: hidden width 2·C (paper 1's code)
    t = _maps(2, 4, 4, 4, seed=3)
    assert term([t.clone()], [t], **KW).item() == pytest.approx(0.0, abs=1e-12)


def test_ofd_term_stage_weights_and_reference_normalisation():
    s_shapes, t_shapes = [(3, 4, 4), (3, 2, 2), (5, 2, 2)], [(4, 4, 4), (4, 2, 2), (6, 2, 2)]
    margins = [-torch.rand(4), -torch.rand(4), -torch.rand(6)]
    term = OFDTerm(s_shapes, t_shapes, margins=margins)
    assert term.stage_weights == [0.25, 0.5, 1.0]
    s = [_maps(2, *sh, seed=i) for i, sh in enumerate(s_shapes)]
    t = [_maps(2, *sh, seed=10 + i) for i, sh in enumerate(t_shapes)]
    want = sum(w * ofd_partial_l2(c(a), b, m) for w, c, a, b, m in
               zip([0.25, 0.5, 1.0], term.connectors, s, t, margins)) / (1000 * 2)
    assert term(s, t, **KW).item() == pytest.approx(want.item(), rel=1e-5)
    batch = OFDTerm(s_shapes, t_shapes, margins=margins, normalization="batch", stage_weights="uniform")
    batch.load_state_dict(term.state_dict())
    want_b = sum(ofd_partial_l2(c(a), b, m) for c, a, b, m in zip(term.connectors, s, t, margins)) / 2
    assert batch(s, t, **KW).item() == pytest.approx(want_b.item(), rel=1e-5)
    assert {k for k in term.state_dict() if k.startswith("margin")} == {"margin0", "margin1", "margin2"}


class _PostActBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.preact = nn.Identity()


def test_teacher_margins_find_the_bn_behind_a_pre_relu_tap():
    block = nn.Sequential(_PostActBlock())
    nn.init.uniform_(block[0].bn2.weight, 0.5, 2.0)
    nn.init.uniform_(block[0].bn2.bias, -1.0, 1.0)
    m = teacher_margins(block, ["0.preact"], [4])[0]
    torch.testing.assert_close(m, ofd_margin(block[0].bn2.weight, block[0].bn2.bias))  # last BN sibling
    direct = teacher_margins(block, ["0.bn1"], [4])[0]
    torch.testing.assert_close(direct, ofd_margin(block[0].bn1.weight, block[0].bn1.bias))
    explicit = teacher_margins(block, ["0.preact"], [4], margin_paths=["0.bn1"])[0]
    torch.testing.assert_close(explicit, direct)
    with pytest.raises(KDGuardError, match="no affine BatchNorm"):
        teacher_margins(block, ["0.conv"], [8])


def test_crd_memory_update_and_normalisation_constant():
    torch.manual_seed(0)
    mem = ContrastMemory(4, 10, nce_k=3, momentum=0.5)
    old_s = mem.memory_s.clone()
    v_s = nn.functional.normalize(torch.randn(2, 4), dim=1)
    v_t = nn.functional.normalize(torch.randn(2, 4), dim=1)
    index = torch.tensor([1, 7])
    out_s, out_t = mem(v_s, v_t, index)
    assert out_s.shape == out_t.shape == (2, 4)
    z = mem.z_s.item()
    assert z > 0
    want = nn.functional.normalize(0.5 * old_s[index] + 0.5 * v_s, dim=1)
    torch.testing.assert_close(mem.memory_s[index], want)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(mem.memory_s[untouched], old_s[untouched])
    mem(v_s, v_t, index)
    assert mem.z_s.item() == z  # Z is fixed after the first batch
    assert ContrastMemory(4, 10, nce_k=16384).k == 9  # K capped at N - 1


def test_crd_class_exclusive_negatives():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    mem = ContrastMemory(4, 10, nce_k=50, labels=labels)
    index = torch.tensor([0, 3, 6, 9])
    idx = mem.sample(index)
    assert idx.shape == (4, 10) and torch.equal(idx[:, 0], index)
    assert (labels[idx[:, 1:]] != labels[index][:, None]).all()
    assert set(idx[0, 1:].tolist()) <= {2, 3, 4, 5, 6, 7, 8}
    with pytest.raises(KDGuardError, match="two classes"):
        ContrastMemory(4, 3, labels=torch.zeros(3, dtype=torch.long))


def test_crd_term_loss_is_the_sum_of_both_nce_terms():
    torch.manual_seed(0)
    term = CRDTerm([(5,)], [(7,)], dataset_size=12, nce_k=4)
    s, t = torch.randn(3, 5), torch.randn(3, 7)
    index = torch.tensor([0, 5, 11])
    reference = ContrastMemory(128, 12, nce_k=4)
    reference.load_state_dict(term.memory.state_dict())
    torch.manual_seed(1)
    loss = term([s], [t], index=index, **KW)
    torch.manual_seed(1)  # same negatives
    out_s, out_t = reference(term.embed_s(s), term.embed_t(t), index)
    assert loss.item() == pytest.approx((crd_nce_loss(out_s, 12) + crd_nce_loss(out_t, 12)).item(), rel=1e-5)
    with pytest.raises(KDGuardError, match="index"):
        term([s], [t], **KW)
