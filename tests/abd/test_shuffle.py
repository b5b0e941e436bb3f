"""The shuffled teacher: which layers, what is permuted, and what is left alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdguard.abd import (
    ShuffledTeacher,
    execution_order,
    permute_input_channels,
    select_shuffle_layers,
)
from kdguard.errors import KDGuardError
from kdguard.models import build_model


class ReversedDefinition(nn.Module):
    """Convolutions defined in the opposite order of their execution, plus a depthwise one."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.early = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.early(x))
        h = F.relu(self.depthwise(h))
        h = F.relu(self.late(h))
        return self.fc(h.mean((2, 3)))


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_layers_follow_execution_order_and_skip_depthwise():
    model = _frozen(ReversedDefinition())
    x = torch.rand(2, 3, 8, 8)
    assert execution_order(model, x, lambda m: isinstance(m, nn.Conv2d)) == ["early", "depthwise", "late"]
    assert select_shuffle_layers(model, x, 1) == ["late"]
    assert select_shuffle_layers(model, x, -1) == ["early"]
    with pytest.warns(UserWarning, match="all 2 convolutions"):
        assert select_shuffle_layers(model, x, 5) == ["early", "late"]


def test_resnet_takes_its_last_five_convolutions():
    model = _frozen(build_model("resnet20", num_classes=10, in_channels=3))
    paths = select_shuffle_layers(model, torch.rand(2, 3, 32, 32), 5)
    convs = [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(paths) == 5 and all(p in convs for p in paths)
    assert paths[-1] == convs[-1]  # ResNet-20 defines its convolutions in execution order


def test_mlp_falls_back_to_linear_layers_and_a_model_without_either_is_refused():
    mlp = _frozen(nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)))
    with pytest.warns(UserWarning, match="all 2 linear layers"):
        assert select_shuffle_layers(mlp, torch.rand(2, 3, 2, 2), 5) == ["1", "3"]
    with pytest.raises(KDGuardError, match="no convolution or linear layer"):
        select_shuffle_layers(_frozen(nn.Sequential(nn.Flatten())), torch.rand(2, 3, 2, 2), 1)
    with pytest.raises(KDGuardError, match="0 layers"):
        select_shuffle_layers(mlp, torch.rand(2, 3, 2, 2), 0)


def test_copies_permute_exactly_the_chosen_input_channels_and_leave_the_teacher_alone():
    teacher = _frozen(build_model("resnet8", num_classes=4, in_channels=3))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    shuffled = ShuffledTeacher(teacher, torch.rand(2, 3, 16, 16), layers=3, ensemble=2,
                               generator=torch.Generator().manual_seed(0))
    assert len(shuffled.members) == 2 and len(shuffled.paths) == 3
    for member, perms in zip(shuffled.members, shuffled.perms):
        for name, module in member.named_modules():
            if not isinstance(module, nn.Conv2d):
                continue
            original = teacher.get_submodule(name).weight
            if name in shuffled.paths:
                perm = perms[name]
                assert not torch.equal(perm, torch.arange(len(perm)))
                assert torch.equal(module.weight, original[:, perm])
            else:
                assert torch.equal(module.weight, original)
        assert not any(p.requires_grad for p in member.parameters()) and not member.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed"
    x = torch.rand(4, 3, 16, 16)
    expected = torch.stack([m(x) for m in shuffled.members]).mean(0)
    assert torch.allclose(shuffled(x), expected)
    assert not torch.allclose(shuffled(x), teacher(x))


def test_a_permutation_of_a_conv_input_equals_permuting_the_input_channels():
    conv = nn.Conv2d(4, 5, 3, padding=1)
    x = torch.rand(2, 4, 6, 6)
    perm = torch.tensor([2, 0, 3, 1])
    expected = conv(x[:, torch.argsort(perm)])
    permute_input_channels(conv, perm)
    # W' = W[:, perm] on x equals W on x with its channels reordered by the inverse permutation
    assert torch.allclose(conv(x), expected, atol=1e-6)
    with pytest.raises(KDGuardError, match="not a permutation"):
        permute_input_channels(conv, torch.tensor([0, 0, 1, 2]))


def test_perms_rebuild_the_same_model_and_hooks_on_the_teacher_are_not_copied():
    teacher = _frozen(build_model("resnet8", num_classes=4, in_channels=3))
    calls = []
    teacher.fc.register_forward_hook(lambda *a: calls.append(1))
    a = ShuffledTeacher(teacher, torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    b = ShuffledTeacher(teacher, torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    calls.clear()
    x = torch.rand(3, 3, 16, 16)
    assert not torch.allclose(a(x), b(x))
    b.set_perms(a.get_perms())
    assert torch.equal(a(x), b(x))
    assert calls == []  # the copies do not fire the teacher's hooks
    with pytest.raises(KDGuardError, match="do not match"):
        b.set_perms(a.get_perms()[:1])


class DataDependent(nn.Module):
    """A model torch.fx cannot trace (control flow on a tensor value)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        if h.mean() > -1:  # always true, but only known at run time
            h = F.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("arch", ["resnet8", "wrn16_1", "lenet5"])
def test_shared_trunk_gives_the_plain_ensemble_logits_and_gradients(arch):
    channels, size = (1, 28) if arch == "lenet5" else (3, 16)
    teacher = _frozen(build_model(arch, num_classes=4, in_channels=channels))
    calls = []
    for m in teacher.modules():
        m.register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LeNet-5 has fewer than 5 convolutions
        shuffled = ShuffledTeacher(teacher, torch.rand(2, channels, size, size),
                                   generator=torch.Generator().manual_seed(0))
    assert shuffled.shared_trunk
    calls.clear()
    x = torch.rand(5, channels, size, size, requires_grad=True)
    fast = shuffled(x)
    (g_fast,) = torch.autograd.grad(fast.sum(), x)
    slow = shuffled._slow_forward(x)
    (g_slow,) = torch.autograd.grad(slow.sum(), x)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(g_fast, g_slow, atol=1e-5)
    assert calls == []  # neither path runs the teacher's own modules


def test_an_untraceable_model_falls_back_to_the_plain_ensemble():
    teacher = _frozen(DataDependent())
    shuffled = ShuffledTeacher(teacher, torch.rand(2, 3, 6, 6), layers=1, ensemble=2,
                               generator=torch.Generator().manual_seed(0))
    assert not shuffled.shared_trunk
    x = torch.rand(3, 3, 6, 6)
    assert torch.allclose(shuffled(x), torch.stack([m(x) for m in shuffled.members]).mean(0))
