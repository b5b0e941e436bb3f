"""SimCLR and BadEncoder training steps, the four teachers, three students, the distiller and the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdguard.attacks.triggers import build_trigger
from kdguard.config import OptimConfig, TrainConfig
from kdguard.errors import KDGuardError
from kdguard.ssl.badencoder import BackdoorTarget, run_badencoder, select_references
from kdguard.ssl.cache import cached_model
from kdguard.ssl.defense import (EncoderDistiller, distill_encoder, prepare_student, prepare_teacher,
                                 prune_last_stage)
from kdguard.ssl.encoder import clone_model
from kdguard.ssl.simclr import train_simclr


def test_simclr_training_changes_the_model_and_resumes(tiny_model, blobs3, tmp_path, state_equal, train_cfg):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    hist = train_simclr(tiny_model, blobs3.images, train_cfg(epochs=1), run_dir=tmp_path, seed=0)
    assert len(hist) == 1 and hist[0].losses["simclr"] > 0
    assert not state_equal(tiny_model.state_dict(), before)
    again = train_simclr(tiny_model, blobs3.images, train_cfg(epochs=1), run_dir=tmp_path, seed=0)
    assert len(again) == 1 and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # nothing re-run
    with pytest.raises(KDGuardError, match="expected uint8"):
        train_simclr(tiny_model, blobs3.images.float(), train_cfg())


def test_badencoder_pulls_triggered_inputs_to_the_reference(tiny_model, blobs3, state_equal):
    clean = tiny_model.eval()
    poisoned = clone_model(clean)
    trig = build_trigger("badnets_square", blobs3.shape, size=5, position=(10, 10))
    target = BackdoorTarget(blobs3.name, 1, trig, select_references(blobs3, 1, 1))
    sgd = TrainConfig(epochs=6, batch_size=16, progress=False, device="cpu", amp="off", channels_last="off",
                      optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, schedule="constant"))
    bn_before = {k: v.clone() for k, v in poisoned.state_dict().items() if "running" in k or "bn" in k}
    head_before = {k: v.clone() for k, v in poisoned.head.state_dict().items()}

    def sim(model):
        with torch.no_grad():
            model.eval()
            ref = model.encoder(target.references.float() / 255)
            bd = model.encoder(trig(blobs3.images).float() / 255)
            return F.cosine_similarity(bd, ref.expand_as(bd)).mean().item()

    start = sim(poisoned)
    hist = run_badencoder(poisoned, clean, blobs3.images, [target], sgd, seed=0)
    assert {"l0", "l1", "l2"} == set(hist[-1].losses)
    # untrained features are all alike (cos ≈ 0.97), so compare cosine *distances*
    assert 1 - sim(poisoned) < 0.3 * (1 - start)
    with torch.no_grad():
        x = blobs3.images.float() / 255
        kept = F.cosine_similarity(poisoned.encoder(x), clean.encoder(x)).mean().item()
    assert kept > 0.95                                                   # clean embeddings stay put
    after = poisoned.state_dict()
    assert all(torch.equal(after[k], v) for k, v in bn_before.items())   # BatchNorm frozen
    assert state_equal(poisoned.head.state_dict(), head_before)           # only the encoder trains
    with pytest.raises(KDGuardError, match="references"):
        run_badencoder(poisoned, clean, blobs3.images, [BackdoorTarget("b", 1, trig)], sgd)


@pytest.mark.parametrize("kind", ["poisoned", "finetuned", "nad", "fine_pruning"])
def test_each_teacher_builds(kind, tiny_model, blobs3, tiny_defense, tmp_path, state_equal):
    poisoned = tiny_model.eval()
    before = {k: v.clone() for k, v in poisoned.state_dict().items()}
    teacher = prepare_teacher(kind, poisoned, blobs3.images, tiny_defense, cache=tmp_path)
    assert teacher is not poisoned and state_equal(poisoned.state_dict(), before)
    same = state_equal(teacher.state_dict(), before)
    assert same == (kind == "poisoned")
    if kind == "fine_pruning":
        assert int((teacher.encoder.channel_mask == 0).sum()) == round(0.2 * 64)
    if kind != "poisoned":   # cached: a second call loads the same weights without training
        again = prepare_teacher(kind, poisoned, blobs3.images, tiny_defense, cache=tmp_path)
        assert state_equal(again.state_dict(), teacher.state_dict())


@pytest.mark.parametrize("kind", ["random", "warmup", "poisoned"])
def test_each_student_builds(kind, tiny_model, blobs3, tiny_defense, tmp_path, state_equal):
    student = prepare_student(kind, tiny_model, blobs3.images, tiny_defense, cache=tmp_path, seed=3)
    assert student is not tiny_model and student.spec() == tiny_model.spec()
    assert state_equal(student.state_dict(), tiny_model.state_dict()) == (kind == "poisoned")
    if kind == "warmup":
        fresh = prepare_student("random", tiny_model, blobs3.images, tiny_defense, cache=tmp_path, seed=3)
        assert not state_equal(student.state_dict(), fresh.state_dict())
    with pytest.raises(KDGuardError, match="unknown student"):
        prepare_student("copy", tiny_model, blobs3.images, tiny_defense, cache=tmp_path)


def test_distiller_terms_and_training(tiny_model, blobs3, tiny_defense):
    teacher = tiny_model.eval()
    student = clone_model(teacher)
    d = EncoderDistiller(student, teacher, "at", stage_weights=None, output_weight=1.0)
    x = torch.rand(8, 3, 16, 16)
    student.eval()  # same mode as the teacher: identical features, so the distillation terms vanish
    losses = d.losses(x, x.flip(3))
    assert set(losses) == {"simclr", "distill", "output"}
    assert losses["distill"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["output"].item() == pytest.approx(-1.0, abs=1e-5)
    d.remove_hooks()
    with pytest.raises(KDGuardError, match="same object"):
        EncoderDistiller(teacher, teacher, "at", stage_weights=None)
    with pytest.raises(KDGuardError, match="output_weight"):
        EncoderDistiller(student, teacher, "sp", stage_weights=None, options={"variant": "output"})
    hist = distill_encoder(clone_model(teacher), teacher, blobs3.images, "fitnet", tiny_defense)
    assert {"simclr", "distill"} == set(hist[-1].losses)


def test_fine_pruning_switches_off_the_least_active_channels(tiny_model, blobs3):
    model = tiny_model.eval()
    pruned = prune_last_stage(model, blobs3.images, 0.25)
    assert len(pruned) == 16
    mask = model.encoder.channel_mask
    assert int((mask == 0).sum()) == 16 and all(mask[i] == 0 for i in pruned)
    with pytest.raises(KDGuardError):
        prune_last_stage(model, blobs3.images, 1.0)


def test_cache_refuses_a_model_built_with_other_settings(tiny_model, tmp_path):
    built = []
    cached_model(tmp_path / "m", {"epochs": 1}, lambda d: built.append(d) or clone_model(tiny_model), "teacher")
    cached_model(tmp_path / "m", {"epochs": 1}, lambda d: built.append(d) or clone_model(tiny_model), "teacher")
    assert len(built) == 1
    with pytest.raises(KDGuardError, match="other settings"):
        cached_model(tmp_path / "m", {"epochs": 2}, lambda d: clone_model(tiny_model), "teacher")
