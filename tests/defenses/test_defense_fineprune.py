"""Fine-pruning pieces on tiny models: activation ranking, consumer detection, masks that persist."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdguard.defenses import ChannelPruner, channel_activations, find_consumer, select_prune_count
from kdguard.errors import KDGuardError
from kdguard.models import build_model

BIASES = [0.5, 0.3, 0.9, 0.7, -1.0, 0.1]  # channel 4 is dead (ReLU of a negative constant)


class DeadChannelNet(nn.Module):
    """conv → [conv with zero weights + ReLU] ("block") → pool → fc; block channel c outputs relu(BIASES[c])."""

    stage_presets = {"stages": ["conv1", "block"]}

    def __init__(self, second_head: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, len(BIASES), 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(len(BIASES), 3)
        self.fc2 = nn.Linear(len(BIASES), 3) if second_head else None
        with torch.no_grad():
            self.block[0].weight.zero_()
            self.block[0].bias.copy_(torch.tensor(BIASES))

    def forward(self, x):
        h = self.pool(self.block(torch.relu(self.conv1(x)))).flatten(1)
        return self.fc(h) + (self.fc2(h) if self.fc2 is not None else 0)


def _images(n=6, c=1, size=8):
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_dead_channel_has_lowest_activation_and_is_pruned_first():
    model = DeadChannelNet()
    acts = channel_activations(model, "block", _images(), batch_size=4)
    assert acts.shape == (6,)
    assert torch.allclose(acts, torch.tensor(BIASES).clamp(min=0), atol=1e-6)
    order = torch.argsort(acts, stable=True)
    assert order.tolist() == [4, 5, 1, 0, 3, 2]
    pruner = ChannelPruner(model, "block", _images(2).float() / 255)
    pruner.prune(order[:1])
    assert pruner.consumer.path == "fc" and pruner.consumer.group == 1
    assert model.fc.weight[:, 4].abs().max() == 0 and model.fc.weight[:, 5].abs().min() > 0
    assert pruner.mask.tolist() == [True, True, True, True, False, True]


@pytest.mark.parametrize("arch, shape, path, kind, group", [
    ("lenet5", (1, 28, 28), "fc1", "linear", 25),   # block2 16×5×5 → flatten → Linear(400)
    ("resnet8", (3, 32, 32), "fc", "linear", 1),    # layer3 → global pool → fc
    ("wrn16_1", (3, 32, 32), "bn_final", "batchnorm", 1),
])
def test_consumer_is_the_first_weighted_layer_after_the_stage(arch, shape, path, kind, group):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, in_channels=shape[0]).eval()
    x = torch.rand(2, *shape)
    from kdguard.models import stage_paths
    layer = stage_paths(model, "stages")[-1]
    consumer = find_consumer(model, layer, x)
    assert (consumer.path, consumer.kind, consumer.group) == (path, kind, group)
    pruner = ChannelPruner(model, layer, x)
    before = model(x)
    pruner.prune([0, 3])
    pruner.check_unused(x)  # noise on channels 0 and 3 cannot reach the logits any more
    assert not torch.allclose(before, model(x))


def test_conv_consumer_zeroes_input_slices():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(1))
    x = torch.rand(2, 1, 5, 5)
    pruner = ChannelPruner(model, "1", x)  # the ReLU's output feeds the 1×1 conv "2"
    assert (pruner.consumer.path, pruner.consumer.kind) == ("2", "conv")
    pruner.prune([1, 2])
    assert model[2].weight[:, [1, 2]].abs().max() == 0 and model[2].weight[:, [0, 3]].abs().min() > 0
    pruner.check_unused(x)


def test_pruned_weights_stay_zero_through_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=3, in_channels=1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 3, (8,))
    pruner = ChannelPruner(model, "block2", x[:2])
    pruner.prune([2, 7, 11])
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4, nesterov=True)
    handle = pruner.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    cols = model.fc1.weight.view(120, 16, 25)
    assert cols[:, [2, 7, 11]].abs().max() == 0
    assert cols[:, [0, 1, 3]].abs().min() > 0
    pruner.check_unused(x[:2])
    handle.remove()  # without the hook, the next step revives them (the test above can fail)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert cols[:, [2, 7, 11]].abs().max() > 0


def test_prune_restores_then_sets_exactly_the_given_channels():
    model = DeadChannelNet()
    x = _images(2).float() / 255
    pruner = ChannelPruner(model, "block", x)
    w0 = model.fc.weight.detach().clone()
    pruner.prune([0, 1, 2])
    pruner.prune([1])
    assert torch.equal(model.fc.weight[:, [0, 2]], w0[:, [0, 2]]) and model.fc.weight[:, 1].abs().max() == 0
    with pytest.raises(KDGuardError, match="distinct indices"):
        pruner.prune([1, 1])
    with pytest.raises(KDGuardError, match="distinct indices"):
        pruner.prune([6])


def test_layer_read_by_two_modules_is_refused():
    model = DeadChannelNet(second_head=True)
    x = _images(2).float() / 255
    pruner = ChannelPruner(model, "block", x)
    pruner.prune([4, 5])  # fc is zeroed but fc2 still reads both channels
    with pytest.raises(KDGuardError, match="still change the output"):
        pruner.check_unused(x)


def test_unprunable_layers_give_clear_errors():
    x = torch.rand(2, 1, 8, 8)
    model = DeadChannelNet()
    with pytest.raises(KDGuardError, match="does not exist"):
        find_consumer(model, "blok", x)
    with pytest.raises(KDGuardError, match="no layer with weights follows"):
        find_consumer(model, "fc", x)
    head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1, groups=4))
    with pytest.raises(KDGuardError, match="cannot mask"):
        find_consumer(head, "0", x)


def _fake_accuracy(pruner):
    return lambda: {"ca": 0.9 - 0.02 * len(pruner.channels), "asr": 0.5}


def test_selection_keeps_the_largest_count_within_the_relative_tolerance():
    model = DeadChannelNet()
    pruner = ChannelPruner(model, "block", _images(2).float() / 255)
    order = torch.tensor([4, 5, 1, 0, 3, 2])
    k, curve = select_prune_count(pruner, order, _fake_accuracy(pruner), tolerance=0.1, step_ratio=0.01)
    # (0.02·k)/0.9 ≤ 0.1 ⇔ k ≤ 4.5: k = 5 is evaluated and stops the search.
    assert k == 4 and [c["k"] for c in curve] == [0, 1, 2, 3, 4, 5]
    assert curve[-1]["relative_drop"] == pytest.approx(0.1 / 0.9)
    assert pruner.channels.tolist() == [4, 5, 1, 0]
    k, curve = select_prune_count(pruner, order, _fake_accuracy(pruner), tolerance=0.1, step_ratio=0.5)
    assert k == 3 and [c["k"] for c in curve] == [0, 3]  # step 3; k = 6 would prune every channel
    k, _ = select_prune_count(pruner, order, _fake_accuracy(pruner), tolerance=1.0, max_ratio=0.5)
    assert k == 3
    with pytest.raises(KDGuardError, match="step_ratio"):
        select_prune_count(pruner, order, _fake_accuracy(pruner), step_ratio=0.0)
