import pytest

from kdguard.config import DistillJob, TeacherJob, build_config
from kdguard.errors import KDGuardError, check_range, unknown_name
from kdguard.registry import Registry


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: resnet20\ntrain:\n  epochs: 7\n  optim:\n    lr: 0.05\n")
    job = build_config(TeacherJob, path, ["train.epochs=9", "attack.target=3"])
    assert job.model == "resnet20" and job.train.epochs == 9 and job.train.optim.lr == 0.05
    assert job.attack.target == 3


@pytest.mark.parametrize("override, fragment", [
    (["train.epochs=abc"], "could not be converted"),
    (["train.nope=1"], "nope"),
    (["epochs"], "key=value"),
])
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(KDGuardError) as exc:
        build_config(TeacherJob, None, override)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(KDGuardError, match="teacher"):
        build_config(DistillJob)
    with pytest.raises(KDGuardError, match="does not exist"):
        build_config(TeacherJob, tmp_path / "absent.yaml")


def test_registry_lookup_aliases_and_suggestions():
    reg = Registry("widget")
    reg.add("resnet20", 1, aliases=("resnet-20",), family="resnet")
    assert reg.get("ResNet-20") == 1 and reg.meta("resnet_20") == {"family": "resnet"}
    with pytest.raises(KDGuardError, match="did you mean 'resnet20'"):
        reg.get("resnet2")
    with pytest.raises(KDGuardError, match="twice"):
        reg.add("resnet20", 2)


def test_check_range_bounds():
    assert check_range("poison rate", 1.0, 0, 1, low_open=True) == 1.0
    with pytest.raises(KDGuardError, match=r"poison rate 0 is outside \(0, 1\]"):
        check_range("poison rate", 0, 0, 1, low_open=True)
    assert "choose one of: a, b" in str(unknown_name("thing", "c", ["b", "a"]))


def test_on_off_switches_survive_yaml_booleans():
    import torch

    from kdguard.errors import KDGuardError as Err
    from kdguard.runtime import use_bf16, use_channels_last

    job = build_config(TeacherJob, None, ["train.amp=off", "train.channels_last=on"])
    cpu = torch.device("cpu")
    net = torch.nn.Linear(2, 2)
    assert use_bf16(job.train.amp, cpu, net) is False
    assert use_channels_last(job.train.channels_last, cpu, net) is True
    with pytest.raises(Err, match="amp setting 'maybe'"):
        use_bf16("maybe", cpu, net)


def test_cpu_native_bf16_read_from_cpu_flags(tmp_path):
    from kdguard.runtime import cpu_has_native_bf16

    def cpuinfo(flags: str) -> str:
        path = tmp_path / f"cpuinfo_{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\n")
        return str(path)

    assert cpu_has_native_bf16(cpuinfo("fpu sse avx2 fma")) is False
    assert cpu_has_native_bf16(cpuinfo("avx2 avx512f avx512_bf16")) is True
    assert cpu_has_native_bf16(cpuinfo("avx2 amx_tile amx_bf16")) is True
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_amp_auto_on_cpu_follows_native_bf16(monkeypatch):
    import torch

    import kdguard.runtime as runtime

    cpu = torch.device("cpu")
    net = torch.nn.Linear(2, 2)
    lenet = torch.nn.Linear(2, 2)
    lenet.arch = "lenet5"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.use_bf16("auto", cpu, net) is False
    assert runtime.use_bf16("on", cpu, net) is True  # forced even where bf16 is emulated
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.use_bf16("auto", cpu, net) is True
    assert runtime.use_bf16("auto", cpu, lenet) is False


def test_machine_label_names_the_cpu_or_the_gpu(monkeypatch):
    import torch

    from kdguard.runtime import cpu_name, machine_label

    cpu = cpu_name()
    assert cpu and machine_label("cpu") == cpu
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert machine_label(torch.device("cuda", 0)) == f"NVIDIA H200 ({cpu} host)"


def test_cpu_name_reads_the_model_name_of_cpuinfo(tmp_path):
    import platform

    from kdguard.runtime import cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: avx2\n")
    assert cpu_name(str(info)) == "AMD EPYC 7B13"
    bare = tmp_path / "cpuinfo-bare"  # cpu_name caches per path
    bare.write_text("processor\t: 0\nflags\t: avx2\n")  # no model name (some ARM kernels)
    assert cpu_name(str(bare)) == (platform.processor() or platform.machine())
    assert cpu_name(str(tmp_path / "missing")) == (platform.processor() or platform.machine())
