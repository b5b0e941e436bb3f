"""A stranger's teacher in one command: bare weights files, input conventions, in-place ReLUs,
``import-teacher``, and the user-style case on real CIFAR-10."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import cli_error
from their_nets import cifar_resnet

from kdguard.checkpoint import (load_model, load_state_dict, parse_input_norm, sha256_file,
                                unwrap_state_dict)
from kdguard.cli import main
from kdguard.errors import KDGuardError
from kdguard.models import build_model
from kdguard.models.stages import infer_stage_paths, stage_paths
from kdguard.taps import FeatureTaps

USER_ARCH = "their_nets:cifar_resnet"
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture
def user_model():
    torch.manual_seed(0)
    return cifar_resnet().eval()


def _state(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


# -- weights layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "module", "orig_mod", "state_dict", "model", "net",
                                    "model_state_dict"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_common_weight_layouts_load_as_data(layout, suffix, user_model, tmp_path):
    state = _state(user_model)
    if layout == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "orig_mod":
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        if layout not in ("plain", "module", "orig_mod"):
            pytest.skip("safetensors holds a flat tensor dict only")
        save_file(state, str(path))
    else:
        obj = state if layout in ("plain", "module", "orig_mod") else {layout: state, "epoch": 7, "acc": 91.5}
        torch.save(obj, path)
    model, manifest = load_model(path, arch=USER_ARCH, num_classes=10)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(model(x), user_model(x))
    assert manifest["model"] == {"arch": USER_ARCH, "num_classes": 10, "in_channels": 3}


def test_no_tensor_dict_is_a_clear_error(tmp_path):
    torch.save({"epoch": 3, "acc": 0.9}, tmp_path / "meta.pt")
    with pytest.raises(KDGuardError, match="does not hold a state dict of tensors"):
        load_state_dict(tmp_path / "meta.pt")
    with pytest.raises(KDGuardError, match="state dict of tensors"):
        unwrap_state_dict({"state_dict": {"w": 1.0}})


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_weights_must_be_finite_floating_point(bad, user_model, tmp_path):
    state = _state(user_model)
    if bad == "nan":
        state["fc.weight"][0, 0] = float("nan")
    elif bad == "inf":
        state["layer1.0.bn1.weight"][1] = float("inf")
    else:
        state["fc.weight"] = state["fc.weight"].round().to(torch.int64)
    save_file(state, str(tmp_path / "w.safetensors"))
    match = "not floating point" if bad == "int" else "NaN or infinite"
    with pytest.raises(KDGuardError, match=match):
        load_model(tmp_path / "w.safetensors", arch=USER_ARCH, num_classes=10)


def test_integer_buffers_stay_allowed(user_model, tmp_path):
    """BatchNorm's num_batches_tracked is an integer buffer of every torchvision-style model."""
    state = _state(user_model)
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    save_file(state, str(tmp_path / "w.safetensors"))
    load_model(tmp_path / "w.safetensors", arch=USER_ARCH, num_classes=10)


# -- input convention ---------------------------------------------------------------------


def test_input_norm_feeds_the_model_normalised_tensors_with_keys_unchanged(user_model, tmp_path):
    save_file(_state(user_model), str(tmp_path / "w.safetensors"))
    model, manifest = load_model(tmp_path / "w.safetensors", arch=USER_ARCH, num_classes=10,
                                 input_norm="0.5,0.4,0.3/0.2,0.25,0.3")
    assert set(model.state_dict()) == set(user_model.state_dict())
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(model(x), user_model((x - mean) / std), atol=1e-6)
    assert manifest["model"]["input_norm"] == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def test_input_norm_names_and_errors():
    assert parse_input_norm("imagenet", 3)[0] == (0.485, 0.456, 0.406)
    assert parse_input_norm("half", 1) == ((0.5,), (0.5,))
    assert parse_input_norm("0.5/0.25", 3) == ((0.5,) * 3, (0.25,) * 3)
    assert parse_input_norm("none", 3) is None
    for bad, match in (("0.5", "not MEAN/STD"), ("a/b", "not a number"), ("0.5/0", "<= 0"),
                       ("0.1,0.2/0.3,0.4", "2 values for 3")):
        with pytest.raises(KDGuardError, match=match):
            parse_input_norm(bad, 3)


# -- models written the common way ----------------------------------------------------------


def test_taps_record_the_true_output_before_an_in_place_relu(user_model):
    x = torch.rand(2, 3, 32, 32)
    with FeatureTaps(user_model, ["bn1", "layer1.0.bn2"], detach=True) as taps:
        _, feats = taps(x)
    expected = user_model.bn1(user_model.conv1(x))
    assert torch.allclose(feats["bn1"], expected)
    assert feats["bn1"].min() < 0 and feats["layer1.0.bn2"].min() < 0  # pre-ReLU values kept


def test_gradients_flow_through_taps_on_an_in_place_model():
    torch.manual_seed(0)
    model = cifar_resnet().train()
    with FeatureTaps(model, stage_paths(model)) as taps:
        _, feats = taps(torch.rand(2, 3, 32, 32))
        sum(f.pow(2).mean() for f in feats.values()).backward()
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()


def test_stages_of_a_model_without_presets_are_traced(user_model):
    assert stage_paths(user_model) == ["layer1", "layer2", "layer3"]
    assert stage_paths(user_model, "pre_relu") == ["layer1", "layer2", "layer3"]
    assert infer_stage_paths(build_model("resnet20", num_classes=10)) == ["layer1", "layer2", "layer3"]


def test_an_untraceable_model_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(KDGuardError, match="cannot trace the stages.*stage_presets"):
        stage_paths(model)


# -- import-teacher ---------------------------------------------------------------------------


def test_import_teacher_records_digest_and_later_commands_need_no_flags(tmp_path, capsys):
    torch.manual_seed(1)
    lenet = build_model("lenet5", num_classes=10, in_channels=1)
    weights = tmp_path / "downloaded.pt"
    torch.save({"net": {f"module.{k}": v for k, v in lenet.state_dict().items()}}, weights)
    out = tmp_path / "imported"
    assert main(["import-teacher", "--teacher", str(weights), "--teacher-arch", "lenet5", "--num-classes", "10",
                 "--in-channels", "1", "data.name=mnist_embedded", f"out={out}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["imported"]["sha256"] == sha256_file(weights)
    assert manifest["imported"]["weights_sha256"] == sha256_file(out / "model.safetensors")
    assert manifest["model"]["arch"] == "lenet5" and manifest["attack"] is None
    assert 0 <= manifest["metrics"]["ca"] <= 1
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ca"] == pytest.approx(manifest["metrics"]["ca"])


def test_an_imported_import_path_teacher_needs_the_flag_again(user_model, tmp_path, capsys):
    save_file(_state(user_model), str(tmp_path / "w.safetensors"))
    out = tmp_path / "imported"
    assert main(["import-teacher", "--teacher", str(tmp_path / "w.safetensors"), "--teacher-arch", USER_ARCH,
                 "--num-classes", "10", "--teacher-input-norm", "cifar10", f"out={out}"]) == 0
    err = cli_error(["evaluate", str(out), "--dataset", "mnist_embedded"], capsys)
    assert f"pass --teacher-arch {USER_ARCH}" in err
    model, manifest = load_model(out, arch=USER_ARCH)  # the user's own word: honoured
    assert manifest["model"]["input_norm"]["mean"] == [0.4914, 0.4822, 0.4465]
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(model(x), user_model((x - mean) / std), atol=1e-5)


@pytest.mark.parametrize("args, fragment", [
    ([], "has no manifest naming its architecture"),
    (["--teacher-arch", "lenet5"], "--num-classes"),
    (["--teacher-arch", "resnet20", "--num-classes", "10"], "does not match architecture"),
    (["--teacher-arch", USER_ARCH, "--num-classes", "10", "--teacher-input-norm", "1/2/3"], "not MEAN/STD"),
    (["--teacher-arch", "their_nets:not_a_model", "--num-classes", "10"], "not an nn.Module"),
])
def test_bare_file_errors_are_one_line(args, fragment, user_model, tmp_path, capsys):
    save_file(_state(user_model), str(tmp_path / "w.safetensors"))
    err = cli_error(["evaluate", str(tmp_path / "w.safetensors"), "--dataset", "mnist_embedded", *args], capsys)
    assert fragment in err


# -- the user-style case on real CIFAR-10 -------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cifar-cache")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").exists(), reason="needs ../shared/data")
def test_user_style_teacher_runs_every_command_on_cifar10(tmp_path, cifar_cache, monkeypatch, capsys):
    """A model class in the user's module (in-place ReLUs, normalised input), a plain
    .safetensors file saved from DataParallel, CIFAR-10: evaluate, distill, distill-datafree + ABD
    and robustkd run with no hand-written file."""
    monkeypatch.setenv("KDGUARD_CACHE", str(cifar_cache))
    torch.manual_seed(0)
    teacher = cifar_resnet()
    weights = tmp_path / "their_teacher.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    flags = ["--teacher-arch", USER_ARCH, "--num-classes", "10", "--teacher-input-norm", "cifar10",
             "--data-root", str(SHARED_DATA)]
    fast = ["train.epochs=1", "train.batch_size=64", "train.progress=false", "clean_fraction=0.01"]
    data = ["data.name=cifar10"]
    assert main(["evaluate", str(weights), *flags, "--dataset", "cifar10", "--attack", "badnets",
                 "--target", "3", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_clean"] == 10000 and metrics["n_backdoor"] == 9000
    assert main(["distill", "--teacher", str(weights), *flags, *data, "student=resnet8", *fast,
                 f"out={tmp_path / 'kd'}"]) == 0
    assert main(["distill-datafree", "--teacher", str(weights), *flags, *data, "--method", "zskt",
                 "student=resnet8", "schedule.rounds=2", "schedule.student_steps=1", "schedule.batch_size=16",
                 "abd.mode=full", "abd.sr.inner_steps=1", "abd.sr.hypergradient_steps=1",
                 "monitor.eval_batch_size=1000", f"out={tmp_path / 'zskt_abd'}"]) == 0
    assert main(["robustkd", "--teacher", str(weights), *flags, *data, "student=resnet8", *fast,
                 "detox.epochs=1", f"out={tmp_path / 'robustkd'}"]) == 0
    for run in ("kd", "zskt_abd", "robustkd"):
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["config"]["teacher_spec"]["arch"] == USER_ARCH
        assert 0 <= manifest["metrics"]["ca"] <= 1


# -- SSL encoders from bare weights files --------------------------------------------------------


def test_a_bare_backbone_file_becomes_an_ssl_encoder(user_model, tmp_path):
    from kdguard.config import TeacherSpec
    from kdguard.ssl.encoder import load_ssl_model

    torch.save({"state_dict": {f"module.{k}": v for k, v in user_model.state_dict().items()}},
               tmp_path / "simclr_backbone.pth")
    spec = TeacherSpec(arch=USER_ARCH, input_norm="cifar10")
    model, manifest = load_ssl_model(tmp_path / "simclr_backbone.pth", spec)
    assert manifest["imported"]["fresh_head"] is True and manifest["ssl_model"]["arch"] == USER_ARCH
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    user_model.fc = torch.nn.Identity()  # the encoder's features are the classifier's input
    assert torch.allclose(model.encoder(x), user_model((x - mean) / std), atol=1e-5)
    assert model.encoder.stage_paths == ["backbone.layer1", "backbone.layer2", "backbone.layer3"]
    with pytest.raises(KDGuardError, match="--teacher-arch"):
        load_ssl_model(tmp_path / "simclr_backbone.pth")


def test_ssl_probe_takes_a_bare_encoder_file(user_model, tmp_path, capsys):
    save_file(_state(user_model), str(tmp_path / "encoder.safetensors"))
    err = cli_error(["ssl-probe", "--encoder", str(tmp_path / "encoder.safetensors"), "--teacher-arch", "resnet20",
                     f"out={tmp_path / 'probe'}"], capsys)
    assert "does not match architecture 'resnet20'" in err  # the file reached the loader as weights
