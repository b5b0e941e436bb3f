"""Nothing in a teacher's files runs code: manifests, SSL specs, config files and weights are data.

Each payload names a callable that would leave a marker file if kdguard ever imported and called
it. Every command that loads a teacher or encoder must refuse with one line and exit code 2, and
the marker must never appear.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import CLI_FAST, cli_error

from kdguard.checkpoint import load_model, load_state_dict
from kdguard.errors import KDGuardError

REFUSAL = "kdguard never imports code named by a file"


def _payloads(marker: Path, directory: Path) -> dict[str, dict]:
    """arch/options pairs that each create ``marker`` when called."""
    (directory / "hubconf.py").write_text(
        f"def evil(*args, **kwargs):\n    open({str(marker)!r}, 'w').close()\n    raise SystemExit(0)\n")
    return {
        "os:system": {"arch": "os:system", "options": {"command": f"touch {marker}"}},
        "subprocess:getoutput": {"arch": "subprocess:getoutput", "options": {"cmd": f"touch {marker}"}},
        "builtins:exec": {"arch": "builtins:exec",
                          "options": {"source": f"open({str(marker)!r}, 'w').close()"}},
        "torch.hub:load": {"arch": "torch.hub:load",
                           "options": {"repo_or_dir": str(directory), "model": "evil", "source": "local"}},
    }


PAYLOADS = ["os:system", "subprocess:getoutput", "builtins:exec", "torch.hub:load"]


def _tamper_model(run: Path, marker: Path, payload: str) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"].update(_payloads(marker, run)[payload])
    (run / "manifest.json").write_text(json.dumps(manifest))


def _ssl_run(directory: Path, marker: Path, payload: str) -> Path:
    directory.mkdir()
    spec = {**_payloads(marker, directory)[payload], "input_shape": [3, 32, 32], "mean": None, "std": None,
            "proj_hidden": 8, "proj_dim": 4}
    (directory / "manifest.json").write_text(json.dumps({"ssl_model": spec, "dataset": {"name": "cifar10"}}))
    (directory / "model.safetensors").write_bytes(b"")
    return directory


def _commands(run: Path, out: Path) -> dict[str, list[str]]:
    return {
        "evaluate": ["evaluate", str(run)],
        "evaluate-dataset": ["evaluate", str(run), "--dataset", "mnist_embedded"],
        "distill": ["distill", "--teacher", str(run), *CLI_FAST, f"out={out}"],
        "distill-datafree": ["distill-datafree", "--teacher", str(run), "--method", "zskt",
                             "schedule.rounds=1", f"out={out}"],
        "distill-method-zskt": ["distill", "--teacher", str(run), "--method", "zskt", "schedule.rounds=1",
                                f"out={out}"],
        "defend": ["defend", "--model", str(run), "method=ft", *CLI_FAST, f"out={out}"],
        "robustkd": ["robustkd", "--teacher", str(run), *CLI_FAST, f"out={out}"],
        "robustkd-trigger": ["robustkd-trigger", "--teacher", str(run), "epochs=1", f"out={out}"],
        "import-teacher": ["import-teacher", "--teacher", str(run), f"out={out}"],
    }


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("command", list(_commands(Path("r"), Path("o"))))
def test_manifest_architecture_never_runs_code(command, payload, teacher_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    _tamper_model(teacher_copy, marker, payload)
    err = cli_error(_commands(teacher_copy, tmp_path / "out")[command], capsys)
    assert REFUSAL in err and "--teacher-arch" in err
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_load_model_refuses_a_manifest_import_path(payload, teacher_copy, tmp_path):
    marker = tmp_path / "pwned"
    _tamper_model(teacher_copy, marker, payload)
    with pytest.raises(KDGuardError, match=REFUSAL):
        load_model(teacher_copy)
    assert not marker.exists()


def test_an_explicit_arch_from_the_caller_is_honoured(teacher_copy, tmp_path):
    """The same file loads when the caller names a registry architecture itself."""
    _tamper_model(teacher_copy, tmp_path / "pwned", "os:system")
    manifest = json.loads((teacher_copy / "manifest.json").read_text())
    manifest["model"]["options"] = {}
    (teacher_copy / "manifest.json").write_text(json.dumps(manifest))
    model, loaded = load_model(teacher_copy, arch="lenet5")
    assert loaded["model"]["arch"] == "lenet5"
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("command", ["ssl-probe", "ssl-defend"])
def test_ssl_spec_architecture_never_runs_code(command, payload, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = _ssl_run(tmp_path / "encoder", marker, payload)
    args = [command, "--encoder", str(run), f"out={tmp_path / 'out'}"]
    err = cli_error(args, capsys)
    assert REFUSAL in err
    assert not marker.exists()


# -- config files and overrides -------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("model", "os:system"), ("student", "subprocess:getoutput"),
                                        ("teacher_spec.arch", "builtins:exec"),
                                        ("attack.name", "os:system")])
def test_a_config_file_may_not_name_an_import_path(key, value, tmp_path, teacher_run, capsys):
    head, _, leaf = key.rpartition(".")
    body = f"{head}:\n  {leaf}: '{value}'\n" if head else f"{key}: '{value}'\n"
    (tmp_path / "evil.yaml").write_text(body)
    command = "train-teacher" if key == "model" else "distill"
    args = [command, "--config", str(tmp_path / "evil.yaml"), f"out={tmp_path / 'o'}"]
    if command == "distill":
        args.append(f"teacher={teacher_run}")
    err = cli_error(args, capsys)
    assert REFUSAL in err and f"{key}={value}" in err


def test_an_import_path_overridden_on_the_command_line_is_the_users(tmp_path, capsys):
    """The file's import path is refused unless the command line sets that key itself."""
    (tmp_path / "run.yaml").write_text("model: nonexistent_pkg.nets:Net\ntrain:\n  epochs: 1\n")
    err = cli_error(["train-teacher", "--config", str(tmp_path / "run.yaml"),
                     "model=nonexistent_pkg.nets:Other", f"out={tmp_path / 'o'}"], capsys)
    assert "cannot import module 'nonexistent_pkg.nets'" in err  # reached the user's own import


@pytest.mark.parametrize("where", ["file", "override"])
@pytest.mark.parametrize("value", ["${oc.env:HOME}", "runs/${x}", "${oc.decode:'[1]'}"])
def test_interpolations_are_refused(where, value, tmp_path, capsys):
    args = ["train-teacher", *CLI_FAST]
    if where == "file":
        (tmp_path / "c.yaml").write_text(f"out: \"{value}\"\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    else:
        args += [f"out={value}"]
    err = cli_error(args, capsys)
    assert "interpolation" in err and "write the value itself" in err
    assert not (Path.cwd() / "runs" / "${x}").exists()


# -- weights files: never unpickled ---------------------------------------------------------


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_payloads(tmp_path: Path, marker: Path) -> dict[str, Path]:
    evil = _Evil(str(marker))
    files: dict[str, Path] = {}

    def dump(name: str, obj: object, protocol: int = 2) -> None:
        files[name] = tmp_path / name
        with open(files[name], "wb") as f:
            pickle.dump(obj, f, protocol=protocol)

    dump("raw.pt", evil)
    dump("in_dict.pt", {"w": evil})
    dump("nested.pth", {"state_dict": {"w": evil}})
    dump("protocol4.pt", {"w": evil}, protocol=4)
    dump("in_list.bin", [torch.zeros(1), evil])
    dump("named.safetensors", {"w": evil})
    # torch's zip format with a malicious data.pkl
    zpath = tmp_path / "zipped.pt"
    torch.save({"w": torch.zeros(2)}, zpath)
    with zipfile.ZipFile(zpath) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"w": evil}, protocol=2)
    with zipfile.ZipFile(zpath, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    files["zipped.pt"] = zpath
    # a whole pickled module (torch.save(model)) is an object, not a state dict
    whole = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), whole)
    files["whole_model.pt"] = whole
    return files


def test_pickle_payloads_in_weights_files_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    for name, path in _pickle_payloads(tmp_path, marker).items():
        with pytest.raises(KDGuardError):
            load_state_dict(path)
        assert not marker.exists(), name


def test_pickle_payload_through_the_cli_is_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = _pickle_payloads(tmp_path, marker)["in_dict.pt"]
    err = cli_error(["evaluate", str(path), "--teacher-arch", "lenet5", "--num-classes", "10",
                     "--in-channels", "1", "--dataset", "mnist_embedded"], capsys)
    assert "never unpickles" in err
    assert not marker.exists()
