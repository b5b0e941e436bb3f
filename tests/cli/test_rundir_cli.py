"""Run directories through the CLI: a changed re-run exits 2 naming the keys, ``--overwrite``
replaces, ``--resume`` lengthens training without an LR jump, a second process gets one line, and
a run killed with SIGKILL several times ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLI_FAST, cli_error
from PIL import Image
from safetensors.torch import load_file, save_file

from kdguard.checkpoint import model_spec, read_manifest, save_model
from kdguard.cli import main
from kdguard.io import read_json
from kdguard.rundir import LOCK_FILE, read_run_record

# teacher_dir (a 1-epoch BadNets LeNet-5, shared by the CLI tests) comes from conftest.py


def _teacher(out, *extra) -> list[str]:
    return ["train-teacher", *CLI_FAST, "model=lenet5", f"out={out}", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _without_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "train_seconds")}


def test_teacher_rerun_with_another_attack_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(_teacher(out)) == 0
    weights = (out / "model.safetensors").read_bytes()
    err = cli_error(_teacher(out, "attack.name=blend"), capsys)
    assert "attack.name: badnets -> blend" in err and "--overwrite" in err and str(out) in err
    assert read_manifest(out)["attack"]["config"]["name"] == "badnets"  # untouched
    # the identical command resumes the finished run: nothing trained again
    assert main(_teacher(out)) == 0
    assert len(_lines(out / "metrics.jsonl")) == 1 and (out / "model.safetensors").read_bytes() == weights
    (out / "stale.png").write_bytes(b"x")
    assert main(_teacher(out, "attack.name=blend", "--overwrite")) == 0
    assert read_manifest(out)["attack"]["config"]["name"] == "blend"
    assert read_run_record(out)["config"]["attack"]["name"] == "blend"
    assert [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1]  # the new run's line only
    assert not (out / "stale.png").exists()
    assert "both" in cli_error(_teacher(out, "--resume", "--overwrite"), capsys)


def test_student_rerun_with_another_method_or_other_teacher_weights_is_refused(teacher_dir, tmp_path, capsys):
    out = tmp_path / "s"

    def args(teacher, *extra):
        return ["distill", f"--teacher={teacher}", *CLI_FAST, "student=lenet5", f"out={out}", *extra]

    assert main(args(teacher_dir)) == 0
    err = cli_error(args(teacher_dir, "--method", "at"), capsys)
    assert "kd.method: kd -> at" in err
    moved = tmp_path / "moved"  # the same weights at another path: the same run
    shutil.copytree(teacher_dir, moved)
    assert main(args(moved)) == 0
    assert len(_lines(out / "metrics.jsonl")) == 1
    other = tmp_path / "other"  # other weights
    shutil.copytree(teacher_dir, other)
    state = load_file(str(other / "model.safetensors"))
    first = sorted(state)[0]
    state[first] = state[first] + 0.01
    save_file(state, str(other / "model.safetensors"))
    err = cli_error(args(other), capsys)
    assert "teacher weights: sha256" in err and str(other) in err and str(moved) in err
    assert read_manifest(out)["teacher"] == str(moved)


def test_resume_with_more_epochs_keeps_the_learning_rate_going_down(tmp_path, capsys):
    out = tmp_path / "t"
    base = _teacher(out, "train.optim.schedule=multistep", "train.optim.milestones=[0.75]")
    assert main([*base, "train.epochs=2"]) == 0
    err = cli_error([*base, "train.epochs=4"], capsys)
    assert "train.epochs: 2 -> 4" in err and "--resume" in err
    assert main([*base, "train.epochs=4", "--resume"]) == 0
    lines = _lines(out / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    lrs = [r["lr"] for r in lines]
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), lrs
    assert lrs[1:] == pytest.approx([0.01] * 3)  # past its milestone: 0.1 · γ, never back to 0.1
    ext = read_run_record(out)["extensions"]
    assert [(e["key"], e["from"], e["to"]) for e in ext] == [("train.epochs", 2, 4)]
    assert read_json(out / "metrics.json")["collapsed"] is False


_HOLD = ("import sys, time\nfrom filelock import FileLock\nlock = FileLock(sys.argv[1], timeout=0)\n"
         "lock.acquire()\nprint('locked', flush=True)\ntime.sleep(60)")


def test_a_second_process_gets_one_line_naming_the_directory(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / LOCK_FILE)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = cli_error(_teacher(out), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert "in use by another kdguard process" in err and str(out) in err
    assert not (out / "model.safetensors").exists()


def test_bad_out_paths_exit_2_and_tilde_expands(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "which is a file" in cli_error(_teacher(a_file / "run"), capsys)
    assert "/proc" in cli_error(_teacher("/proc/kdguard_run"), capsys)
    assert "/sys" in cli_error(_teacher("/sys/kdguard_run"), capsys)
    # ~ is expanded once; the same seed gives the same run wherever it is written
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(_teacher("~/runs/a")) == 0
    assert main(_teacher(tmp_path / "b")) == 0
    a, b = tmp_path / "runs" / "a", tmp_path / "b"
    _same_tensors(a, b)
    assert _without_time(read_json(a / "metrics.json")) == _without_time(read_json(b / "metrics.json"))
    assert [_without_time(r) for r in _lines(a / "metrics.jsonl")] == \
        [_without_time(r) for r in _lines(b / "metrics.jsonl")]


# -- kill -9 ---------------------------------------------------------------------------------------

CLI = [sys.executable, "-c", "from kdguard.cli import run; run()"]


def _lines_in(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _run(args: list[str], env: dict) -> None:
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _kill_repeatedly(args: list[str], log: Path, kills: int, delay: float, env: dict) -> None:
    """Start the command ``kills`` times; each time SIGKILL it ``delay`` s after it wrote a new
    history line (inside the next epoch/round), then run it to the end."""
    for i in range(kills):
        start = _lines_in(log)
        proc = subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _lines_in(log) <= start:
            if proc.poll() is not None:
                pytest.fail(f"kill {i + 1}: the run ended (rc {proc.returncode}) before it could be killed")
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"kill {i + 1}: no progress in 120 s")
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"kill {i + 1}: the run ended before the kill"
    _run(args, env)


def _datafree_setup(root: Path) -> Path:
    """A 4-class RGB image folder (test split read by the monitor) and an untrained ResNet-8 teacher."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                    root / split / f"c{c}" / f"{i}.png")
    from kdguard.models import build_model

    torch.manual_seed(0)
    teacher = build_model("resnet8", num_classes=4, in_channels=3)
    attack = {"name": "badnets", "target": 0, "poison_rate": None, "label_mode": "all_to_one",
              "poisoning": None, "seed": 0, "params": {}}
    save_model(root / "teacher", teacher, {
        "model": model_spec(teacher, num_classes=4, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3),
        "dataset": {"name": "imagefolder"}, "attack": {"config": attack}, "metrics": {"ca": 0.25, "asr": 1.0}})
    return root / "teacher"


@pytest.mark.slow
def test_sigkill_during_training_then_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "KDGUARD_NUM_THREADS": "1"}
    teacher = ["train-teacher", "train.epochs=6", "train.batch_size=128", "train.progress=false",
               "data.val_fraction=0.05", "model=lenet5"]
    t_dir = _datafree_setup(tmp_path / "data")
    datafree = ["distill-datafree", f"teacher={t_dir}", "method=zskt", "preset=cpu", f"data.root={tmp_path / 'data'}",
                "schedule.rounds=12", "schedule.student_steps=2", "schedule.batch_size=16", "generator.width=8",
                "monitor.every=1", "monitor.grid_every=0", "monitor.checkpoint_every=1", "device=cpu",
                "progress=false"]
    ref, killed, d_ref, d_killed = (tmp_path / n for n in ("ref", "killed", "d_ref", "d_killed"))
    # the uninterrupted references run beside the killed runs (one thread each)
    refs = [subprocess.Popen([*CLI, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for args in ([*teacher, f"out={ref}"], [*datafree, f"out={d_ref}"])]
    try:
        _kill_repeatedly([*teacher, f"out={killed}"], killed / "metrics.jsonl", kills=4, delay=0.1, env=env)
        _kill_repeatedly([*datafree, f"out={d_killed}"], d_killed / "metrics.jsonl", kills=2, delay=0.05, env=env)
    finally:
        errors = [p.communicate(timeout=300)[1] if p.wait(timeout=300) else "" for p in refs]
    assert [p.returncode for p in refs] == [0, 0], errors
    # the teacher, killed 4 times
    _same_tensors(ref, killed)
    assert [r["epoch"] for r in _lines(killed / "metrics.jsonl")] == list(range(1, 7))
    assert [_without_time(r) for r in _lines(ref / "metrics.jsonl")] == \
        [_without_time(r) for r in _lines(killed / "metrics.jsonl")]
    assert _without_time(read_json(ref / "metrics.json")) == _without_time(read_json(killed / "metrics.json"))
    # the ZSKT student, killed twice
    _same_tensors(d_ref, d_killed)
    rounds = _lines(d_killed / "metrics.jsonl")
    assert [r["round"] for r in rounds] == list(range(1, 13))
    assert [_without_time(r) for r in _lines(d_ref / "metrics.jsonl")] == [_without_time(r) for r in rounds]
