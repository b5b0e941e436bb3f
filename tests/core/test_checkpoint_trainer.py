"""Checkpoint round trip, refusal to unpickle, trainer resume and the distiller contract."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from kdguard.checkpoint import load_state_dict, load_weights_into, save_model
from kdguard.config import OptimConfig, TrainConfig
from kdguard.distill import LogitKD
from kdguard.errors import KDGuardError
from kdguard.optim import schedule_factor
from kdguard.train import Trainer
from kdguard.train.trainer import STATE_FILE

from helpers import TinyNet


def _cfg(epochs=2, **kw):
    return TrainConfig(epochs=epochs, batch_size=16, progress=False, device="cpu",
                       optim=OptimConfig(lr=0.05, **kw))


def test_save_and_reload_weights_exactly(tmp_path, tiny_net):
    save_model(tmp_path, tiny_net, {"model": {"arch": "lenet5"}})
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "manifest.json").exists()
    other = TinyNet()
    load_weights_into(other, load_state_dict(tmp_path / "model.safetensors"))
    for (k, a), (_, b) in zip(tiny_net.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_mismatched_architecture_is_a_clear_error(tmp_path, tiny_net):
    save_file({k: v.contiguous() for k, v in TinyNet(num_classes=7).state_dict().items()},
              str(tmp_path / "w.safetensors"))
    with pytest.raises(KDGuardError, match="does not match architecture.*shape mismatch: fc"):
        load_weights_into(tiny_net, load_state_dict(tmp_path / "w.safetensors"))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(KDGuardError, match="never unpickles"):
        load_state_dict(path)


def test_plain_pt_state_dict_loads_as_data(tmp_path, tiny_net):
    torch.save({"state_dict": tiny_net.state_dict()}, tmp_path / "t.pth")
    state = load_state_dict(tmp_path / "t.pth")
    assert set(state) == set(tiny_net.state_dict())


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(KDGuardError, match="cannot read"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_lr_schedules():
    assert schedule_factor(OptimConfig(schedule="cosine"), 0.0) == pytest.approx(1.0)
    assert schedule_factor(OptimConfig(schedule="cosine"), 0.5) == pytest.approx(0.5)
    assert schedule_factor(OptimConfig(schedule="cosine"), 1.0) == pytest.approx(0.0)
    ms = OptimConfig(schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [schedule_factor(ms, p) for p in (0.1, 0.5, 0.8)] == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(KDGuardError, match="schedule"):
        schedule_factor(OptimConfig(schedule="bogus"), 0.3)


def test_training_learns_blobs(blobs):
    torch.manual_seed(0)
    net = TinyNet()
    hist = Trainer(net, _cfg(epochs=15), seed=0).fit(blobs.images, blobs.labels)
    assert hist[-1].losses["ce"] < hist[0].losses["ce"]
    assert hist[-1].train_acc > 0.9


def test_resume_continues_exactly(tmp_path, blobs):
    # A 3-epoch run vs. the same run killed after epoch 2 and resumed: identical weights.
    torch.manual_seed(0)
    full = TinyNet()
    init = {k: v.clone() for k, v in full.state_dict().items()}
    Trainer(full, _cfg(epochs=3), seed=1).fit(blobs.images, blobs.labels)

    calls = []

    def crash_in_epoch_3(model):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {}

    part = TinyNet()
    part.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        Trainer(part, _cfg(epochs=3), run_dir=tmp_path, seed=1,
                evaluate=crash_in_epoch_3).fit(blobs.images, blobs.labels)
    assert (tmp_path / STATE_FILE).exists()
    resumed = TinyNet()  # fresh process: different initial weights, state comes from disk
    trainer = Trainer(resumed, _cfg(epochs=3), run_dir=tmp_path, seed=1)
    hist = trainer.fit(blobs.images, blobs.labels)
    assert trainer.start_epoch == 2 and [r.epoch for r in hist] == [1, 2, 3]
    for k, v in full.state_dict().items():
        assert torch.allclose(v.float(), resumed.state_dict()[k].float(), atol=1e-6), k


class _EpochRecorder(TinyNet):
    def __init__(self):
        super().__init__()
        self.started = []

    def on_epoch_start(self, epoch):
        self.started.append(epoch)


def test_trainer_announces_each_epoch_also_after_resume(tmp_path, blobs):
    # Epoch-dependent loss schedules (DKD's warm-up) are set from this call, so a resumed run
    # must make it for the epoch it resumes at.
    net = _EpochRecorder()
    Trainer(net, _cfg(epochs=3), seed=0).fit(blobs.images, blobs.labels)
    assert net.started == [0, 1, 2]
    Trainer(_EpochRecorder(), _cfg(epochs=2), run_dir=tmp_path, seed=0).fit(blobs.images, blobs.labels)
    resumed = _EpochRecorder()
    Trainer(resumed, _cfg(epochs=4), run_dir=tmp_path, seed=0).fit(blobs.images, blobs.labels)
    assert resumed.started == [2, 3]


def test_resume_refuses_state_of_another_model(tmp_path, blobs):
    Trainer(TinyNet(), _cfg(epochs=1), run_dir=tmp_path).fit(blobs.images, blobs.labels)
    with pytest.raises(KDGuardError, match="does not match"):
        Trainer(TinyNet(num_classes=5), _cfg(epochs=2), run_dir=tmp_path).fit(blobs.images, blobs.labels)


def test_distiller_keeps_teacher_frozen_and_in_eval(blobs):
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = LogitKD(student, teacher, temperature=4.0, alpha=0.9)
    kd.train()
    assert not kd.teacher.training and kd.student.training
    hist = Trainer(kd, _cfg(epochs=2), seed=0).fit(blobs.images, blobs.labels)
    assert set(hist[0].losses) == {"kd", "ce"}
    for k, v in teacher.state_dict().items():  # BN running stats included
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(id(p) in {id(q) for q in teacher.parameters()} for p in kd.trainable_parameters())


def test_distiller_rejects_student_is_teacher(tiny_net):
    with pytest.raises(KDGuardError, match="same object"):
        LogitKD(tiny_net, tiny_net)


def test_architecture_options_survive_a_round_trip(tmp_path):
    from kdguard.checkpoint import load_model, model_spec
    from kdguard.models import build_model

    model = build_model("resnet8", num_classes=10, shortcut="A")
    spec = model_spec(model, num_classes=10, in_channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert spec["options"] == {"shortcut": "A"}
    save_model(tmp_path, model, {"model": spec})
    loaded, manifest = load_model(tmp_path)
    assert loaded.arch_options == {"shortcut": "A"}
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(x), model.eval()(x))
