import pytest
import torch

from kdguard.errors import KDGuardError
from kdguard.taps import FeatureEditor, FeatureTaps


def test_taps_return_stage_outputs_in_order(tiny_net):
    x = torch.rand(2, 1, 12, 12)
    with FeatureTaps(tiny_net, ["conv2", "bn1"]) as taps:
        out, feats = taps(x)
    assert list(feats) == ["conv2", "bn1"]
    assert feats["bn1"].shape == (2, 8, 12, 12) and feats["conv2"].shape == (2, 16, 6, 6)
    assert torch.allclose(out, tiny_net(x))
    assert not tiny_net.conv2._forward_hooks  # removed on exit


def test_input_capture_and_detach(tiny_net):
    taps = FeatureTaps(tiny_net, ["fc"], capture="input", detach=True)
    _, feats = taps(torch.rand(3, 1, 12, 12))
    assert feats["fc"].shape == (3, 16) and not feats["fc"].requires_grad
    taps.remove()


def test_unknown_path_suggests_close_names(tiny_net):
    with pytest.raises(KDGuardError, match="did you mean .*'conv1'"):
        FeatureTaps(tiny_net, ["conv"])


def test_editor_changes_downstream_and_is_removable(tiny_net):
    x = torch.rand(2, 1, 12, 12)
    tiny_net.eval()
    ref = tiny_net(x)
    with FeatureEditor(tiny_net, {"conv2": torch.zeros_like}):
        edited = tiny_net(x)
    assert torch.allclose(edited, tiny_net.fc.bias.expand_as(edited))
    assert torch.allclose(tiny_net(x), ref)
