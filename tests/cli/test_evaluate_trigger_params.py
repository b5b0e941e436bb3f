"""`kdguard evaluate --attack-param`, the refusal of trigger functions named by a run's manifest,
and attack records that state no poison rate a run never had."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import CLI_FAST, cli_error
from PIL import Image

import kdguard.jobs.supervised as supervised
from kdguard.attacks import attack_from_manifest, attack_record, make_attack, poison_dataset
from kdguard.attacks.triggers import FilePatch
from kdguard.cli import main
from kdguard.config import AttackConfig
from kdguard.io import read_json, write_json

# teacher_dir (a 1-epoch BadNets 10 % LeNet-5 on the embedded MNIST digits) comes from conftest.py


@pytest.fixture
def seen_attacks(monkeypatch):
    """The attack specs that `evaluate` measured (evaluate_model still runs)."""
    seen = []
    original = supervised.evaluate_model

    def spy(model, test, attack, **kw):
        seen.append(attack)
        return original(model, test, attack, **kw)

    monkeypatch.setattr(supervised, "evaluate_model", spy)
    return seen


def _evaluate_json(args, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- evaluate --attack-param -----------------------------------------------------------------------

def test_evaluate_a_patch_trigger_from_a_file_with_attack_params(teacher_dir, tmp_path, capsys, seen_attacks):
    pattern = tmp_path / "trigger.png"
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(pattern)
    metrics = _evaluate_json([str(teacher_dir), "--attack", "patch", "--target", "3",
                              "--attack-param", f"pattern_file={pattern}", "--attack-param", "position=[0, 2]",
                              "--attack-param", "alpha=0.5"], capsys)
    spec = seen_attacks[-1]
    assert isinstance(spec.trigger, FilePatch) and spec.target == 3
    assert spec.trigger.position == (0, 2) and spec.trigger.alpha == 0.5
    assert spec.poison_rate is None  # an attack given for evaluation has no poison rate
    assert metrics["n_clean"] == 1000 and 800 < metrics["n_backdoor"] < 1000  # class 3 left out
    assert metrics["asr"] is not None


def test_attack_params_override_the_checkpoints_own_attack_and_attack_from(teacher_dir, tmp_path, capsys,
                                                                             seen_attacks):
    _evaluate_json([str(teacher_dir), "--attack-param", "position=[0,0]", "--attack-param", "size=2"], capsys)
    own = seen_attacks[-1]
    assert own.trigger.name == "badnets_grid" and own.trigger.position == (0, 0) and own.trigger.size == (2, 2)
    assert own.poison_rate == 0.1  # copied from the teacher's own record
    _evaluate_json([str(teacher_dir), "--attack-from", str(teacher_dir), "--attack-param", "variant=abd"], capsys)
    other = seen_attacks[-1]
    assert other.trigger.variant == "abd" and other.trigger.position == (-3, -3)
    _evaluate_json([str(teacher_dir), "--attack-from", str(teacher_dir)], capsys)  # still works alone
    assert seen_attacks[-1].trigger.params() == own.trigger.params() | {"position": [-3, -3], "size": [3, 3]}


@pytest.mark.parametrize("args, fragment", [
    (["--attack-param", "size"], "is not of the form key=value"),
    (["--attack", "badnets", "--attack-param", "colour=3"], "unknown parameter(s) 'colour'"),
    (["--attack", "patch", "--attack-param", "pattern_file=absent.png"], "does not exist"),
    (["--attack", "patch", "--attack-param", "alpha=${oc.env:HOME}"], "interpolation"),
])
def test_bad_attack_params_are_one_line_errors(teacher_dir, capsys, args, fragment):
    assert fragment in cli_error(["evaluate", str(teacher_dir), *args], capsys)


# --- trigger functions named by a manifest are never imported ----------------------------------------

def _tampered_run(teacher_dir, tmp_path, config_name, params=None, trigger_name=None):
    run = tmp_path / "tampered"
    shutil.copytree(teacher_dir, run)
    manifest = read_json(run / "manifest.json")
    manifest["attack"]["config"]["name"] = config_name
    manifest["attack"]["config"]["params"] = params or {}
    if trigger_name is not None:
        manifest["attack"]["trigger"]["name"] = trigger_name
    write_json(run / "manifest.json", manifest)
    return run


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module whose import alone writes a marker file."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "kdg_evil_trigger.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef fn(images):\n    return images\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


@pytest.mark.parametrize("name, params, trigger_name", [
    ("os:system", {"command": "touch {marker}"}, None),
    ("builtins:exec", {"source": "open({marker!r}, 'w').close()"}, None),
    ("kdg_evil_trigger:fn", {}, None),
    ("badnets", {}, "kdg_evil_trigger:fn"),
])
def test_a_manifest_naming_a_trigger_function_is_refused(teacher_dir, tmp_path, capsys, evil_module,
                                                        name, params, trigger_name):
    marker = evil_module
    params = {k: v.format(marker=str(marker)) for k, v in params.items()}
    run = _tampered_run(teacher_dir, tmp_path, name, params, trigger_name)
    named = trigger_name or name
    for args in (["evaluate", str(run)],
                 ["evaluate", str(teacher_dir), "--attack-from", str(run)],
                 ["distill", "--teacher", str(run), *CLI_FAST, f"out={tmp_path / 'student'}"],
                 ["distill", "--teacher", str(run), "--method", "zskt", "preset=cpu", "schedule.rounds=1",
                  "device=cpu", f"out={tmp_path / 'datafree'}"]):
        err = cli_error(args, capsys)
        assert f"names the trigger function {named!r}, an import path; kdguard never imports code named by a file" in err, err
        assert f"pass attack.name={named} (or --attack {named} for evaluate) on the command line" in err
    assert not marker.exists()


def test_the_same_function_given_on_the_command_line_is_used(teacher_dir, tmp_path, capsys, evil_module):
    metrics = _evaluate_json([str(teacher_dir), "--attack", "kdg_evil_trigger:fn"], capsys)
    assert evil_module.exists()  # imported because the user named it
    assert metrics["n_backdoor"] == 900


def test_a_malformed_attack_record_is_a_one_line_error(teacher_dir, tmp_path, capsys):
    run = _tampered_run(teacher_dir, tmp_path, "badnets", {})
    manifest = read_json(run / "manifest.json")
    manifest["attack"]["config"]["target"] = "zero"
    write_json(run / "manifest.json", manifest)
    assert "malformed attack record (config.target = 'zero')" in cli_error(["evaluate", str(run)], capsys)


# --- no invented poison rate ---------------------------------------------------------------------------

def test_records_state_a_poison_rate_only_when_known(teacher_dir, tmp_path):
    assert read_json(teacher_dir / "manifest.json")["attack"]["poison_rate"] == 0.1  # it poisoned its data

    copied = tmp_path / "copied"
    assert main(["distill", "--teacher", str(teacher_dir), *CLI_FAST, f"out={copied}"]) == 0
    assert read_json(copied / "manifest.json")["attack"]["poison_rate"] == 0.1  # the teacher's own record

    foreign = tmp_path / "foreign"
    assert main(["distill", "--teacher", str(teacher_dir), *CLI_FAST, "attack.name=blend", "attack.target=2",
                 f"out={foreign}"]) == 0
    record = read_json(foreign / "manifest.json")["attack"]
    assert record["poison_rate"] is None and record["config"]["poison_rate"] is None
    assert record["trigger"]["name"] == "blend" and record["target"] == 2
    report = (foreign / "report.md").read_text()
    assert "how the teacher was poisoned is unknown" in report and "poison rate" not in report

    # a student of that run inherits "unknown", not the blend preset's 10 %
    chained = tmp_path / "chained"
    assert main(["distill", "--teacher", str(foreign), *CLI_FAST, f"out={chained}"]) == 0
    assert read_json(chained / "manifest.json")["attack"]["poison_rate"] is None


def test_poisoning_resolves_the_preset_rate_and_records_it():
    from helpers import make_blobs

    spec = make_attack(AttackConfig(name="badnets_square", params={"size": 2}), (1, 12, 12), 4)
    assert spec.poison_rate is None and spec.preset_rate == 0.1
    assert attack_record(AttackConfig(name="badnets_square"), spec)["poison_rate"] is None
    poisoned = poison_dataset(make_blobs(40), spec, seed=0)
    assert poisoned.num_poisoned == 4 and spec.poison_rate == 0.1
    explicit = make_attack(AttackConfig(name="sig", poison_rate=0.5), (1, 12, 12), 4)
    assert explicit.poison_rate == 0.5


def test_attack_from_manifest_takes_the_recorded_rate_and_files(tmp_path):
    pattern = tmp_path / "p.npy"
    np.save(pattern, np.ones((2, 2), np.float32))
    cfg = AttackConfig(name="patch", params={"pattern_file": "p.npy"})  # relative, as typed
    spec = make_attack(AttackConfig(name="patch", params={"pattern_file": str(pattern)}), (1, 6, 6), 2)
    record = json.loads(json.dumps(attack_record(cfg, spec)))
    back = attack_from_manifest({"attack": record})
    assert back.params["pattern_file"] == str(pattern.resolve())
    assert back.params["pattern_sha256"] == spec.trigger.pattern_sha256 and back.poison_rate is None
    np.save(pattern, np.zeros((2, 2), np.float32))
    with pytest.raises(Exception, match="changed since the trigger was recorded"):
        make_attack(back, (1, 6, 6), 2)
    record["poison_rate"] = 0.05
    assert attack_from_manifest({"attack": record}).poison_rate == 0.05
