"""Encoders (features, stages, channel mask, checkpoints), input conversion and the downstream probe."""

from __future__ import annotations

import pytest
import torch

from kdguard.attacks.triggers import build_trigger
from kdguard.errors import KDGuardError
from kdguard.ssl.badencoder import BackdoorTarget
from kdguard.ssl.data import to_encoder_input
from kdguard.ssl.encoder import build_ssl_model, clone_model, load_ssl_model, save_ssl_model
from kdguard.ssl.probe import extract_features, knn_accuracy, probe_encoder, train_probe


def test_encoder_features_stages_and_mask(tiny_model):
    enc = tiny_model.encoder
    assert enc.feature_dim == 64 and enc.stage_paths == ["backbone.layer1", "backbone.layer2", "backbone.layer3"]
    assert enc.stage_shapes == [(16, 16, 16), (32, 8, 8), (64, 4, 4)]
    x = torch.rand(4, 3, 16, 16)
    h, z = tiny_model.eval()(x)
    assert h.shape == (4, 64) and z.shape == (4, 8)
    copy = clone_model(tiny_model).eval()
    copy.encoder.channel_mask[:32] = 0.0          # the copy's hook uses the copy's own mask
    h_copy = copy.encoder(x)
    assert torch.equal(h_copy[:, :32], torch.zeros(4, 32)) and torch.allclose(h_copy[:, 32:], h[:, 32:])
    assert torch.equal(tiny_model.encoder(x), h)   # the original is untouched


def test_checkpoint_round_trip_keeps_weights_and_mask(tiny_model, tmp_path, state_equal):
    tiny_model.encoder.channel_mask[3] = 0.0
    save_ssl_model(tmp_path, tiny_model, {"role": "test"})
    loaded, manifest = load_ssl_model(tmp_path)
    assert manifest["role"] == "test" and manifest["ssl_model"]["arch"] == "resnet8"
    assert state_equal(loaded.state_dict(), tiny_model.state_dict())
    assert loaded.encoder.channel_mask[3] == 0
    with pytest.raises(KDGuardError, match="not an SSL encoder checkpoint"):
        (tmp_path / "other").mkdir()
        load_ssl_model(tmp_path / "other")


def test_unknown_architecture_and_bad_shape_are_one_line_errors():
    with pytest.raises(KDGuardError, match="unknown model"):
        build_ssl_model("resnet21", (3, 32, 32))
    with pytest.raises(KDGuardError, match="input shape"):
        build_ssl_model("resnet8", (2, 32, 32))


def test_to_encoder_input_resizes_and_expands_channels():
    digits = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    out = to_encoder_input(digits, (3, 32, 32))
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 2])
    flat = torch.full((2, 1, 28, 28), 77, dtype=torch.uint8)   # a constant image stays constant
    assert (to_encoder_input(flat, (3, 32, 32)) == 77).all()
    rgb = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    rgb[:, 1] = 100
    assert to_encoder_input(rgb, (1, 8, 8)).unique().tolist() == [round(0.587 * 100)]
    with pytest.raises(KDGuardError):
        to_encoder_input(torch.rand(2, 1, 8, 8), (3, 8, 8))


def test_probe_training_leaves_the_encoder_unchanged(tiny_model, blobs3, tiny_probe, state_equal):
    tiny_model.train()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grads = [p.requires_grad for p in tiny_model.parameters()]
    trig = build_trigger("badnets_square", blobs3.shape, size=4, position=(10, 10))
    result = probe_encoder(tiny_model.encoder, blobs3, blobs3, target=BackdoorTarget("b", 1, trig),
                           cfg=tiny_probe)
    assert state_equal(tiny_model.state_dict(), before)          # weights and BN running statistics
    assert [p.requires_grad for p in tiny_model.parameters()] == grads
    assert tiny_model.encoder.training                            # mode restored
    assert result.n_test == 32 and result.n_backdoor == 24 and result.target == 1
    assert 0 <= result.ca <= 1 and 0 <= result.asr <= 1 and 0 <= result.asr_all <= 1


def test_probe_head_learns_separable_features():
    from kdguard.ssl.config import ProbeConfig
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(20, 1)
    labels = torch.tensor([0, 1]).repeat(20)
    head = train_probe(feats, labels, 2, ProbeConfig(head="linear", epochs=200, batch_size=8, lr=0.05))
    assert (head(feats).argmax(1) == labels).all()
    with pytest.raises(KDGuardError):
        train_probe(feats, labels[:3], 2, ProbeConfig())


def test_extract_features_are_unit_norm_and_check_the_shape(tiny_model):
    imgs = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    f = extract_features(tiny_model.encoder, imgs, batch_size=4)
    assert f.shape == (6, 64) and torch.allclose(f.norm(dim=1), torch.ones(6), atol=1e-3)
    with pytest.raises(KDGuardError, match="encoder input"):
        extract_features(tiny_model.encoder, torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_knn_accuracy_on_its_own_memory_bank(tiny_model, blobs3):
    acc = knn_accuracy(tiny_model.encoder, blobs3, blobs3, k=1)
    assert acc == pytest.approx(1.0)                 # every image's nearest neighbour is itself
    with pytest.raises(KDGuardError):
        knn_accuracy(tiny_model.encoder, blobs3, blobs3, k=0)
