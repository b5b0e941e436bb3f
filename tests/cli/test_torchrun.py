"""``torchrun --nproc_per_node 2 -m kdguard train-teacher|distill|ssl-pretrain``: the same results as
one process within float tolerance, one writer (rank 0), resumption after a kill, and the refusals.

Tolerance: 2 processes sum the same float32 numbers in another order (two shard gradients
averaged by DistributedDataParallel instead of one batch's; BatchNorm sums per shard, then over
shards), so one step's gradients agree to about 1e-5 relative. The settings below (a few dozen
SGD steps at a small learning rate, one thread per process) keep training out of the regime where
such differences grow (a network leaving its initial plateau at a high learning rate: there two
single-process runs with 1 and 2 threads differ by percents), so weights and per-epoch losses are
compared to 1e-5 (BatchNorm running averages, which add up every step's difference: 1e-4 of their
scale) and the final test metrics to 2e-3 (two images of 1,000).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdguard.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")
TRAIN = ["train.epochs=4", "train.batch_size=64", "train.progress=false", "train.optim.lr=0.02"]
TEACHER = ["train-teacher", *TRAIN, "data.val_fraction=0.8", "model=lenet5", "attack.poison_rate=0.1"]
DISTILL = ["distill", *TRAIN[1:], "train.epochs=2", "data.val_fraction=0.8", "student=lenet5", "clean_fraction=0.2"]
PRETRAIN = ["ssl-pretrain", "train.epochs=2", "train.batch_size=64", "train.progress=false", "train.optim.name=sgd",
            "train.optim.lr=0.05", "data.name=mnist_embedded", "data.limit=256", "encoder.arch=lenet5",
            "encoder.proj_hidden=16", "encoder.proj_dim=8", "knn_k=5"]


def command(n: int, args: list[str]) -> list[str]:
    if n == 1:
        return [sys.executable, "-m", "kdguard", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", "kdguard", *args]


def env() -> dict[str, str]:
    # one thread per process in both runs: the thread count changes float sums too
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
            "KDGUARD_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def launch(n: int, args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command(n, args), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def losses(run: Path) -> list[dict[str, float]]:
    return [json.loads(line)["losses"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path, *, metrics: tuple[str, ...]) -> None:
    """``two`` (2 processes) holds what ``one`` (1 process) holds, within the module's tolerance."""
    assert files(two) == files(one)
    a, b = losses(one), losses(two)
    assert len(a) == len(b)  # one metrics.jsonl line per epoch: a single writer
    for ea, eb in zip(a, b):
        assert ea.keys() == eb.keys()
        for k in ea:
            assert eb[k] == pytest.approx(ea[k], rel=1e-5)
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        # BatchNorm's running averages accumulate every step's float error: 1e-4 of their scale
        tol = 1e-4 * max(1.0, float(wa[k].abs().max())) if ".running_" in k else 1e-5
        torch.testing.assert_close(wb[k].float(), wa[k].float(), atol=tol, rtol=0, msg=k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for k in metrics:
        assert mb[k] == pytest.approx(ma[k], abs=2e-3), k


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The one-process teacher (also the distillation's teacher)."""
    out = tmp_path_factory.mktemp("torchrun") / "teacher1"
    launch(1, [*TEACHER, f"out={out}"])
    return out


def test_teacher_on_two_processes_matches_one_and_rank0_alone_writes(teacher, tmp_path):
    out = tmp_path / "teacher2"
    done = launch(2, [*TEACHER, f"out={out}"])
    assert_same_run(teacher, out, metrics=("ca", "asr", "asr_all", "ra"))
    # rank 0 alone prints: one result line, one progress line per epoch
    assert done.stdout.count("run directory:") == 1
    assert done.stderr.count("[teacher] epoch 1/4") == 1


def test_distill_on_two_processes_matches_one(teacher, tmp_path):
    args = [*DISTILL, "--teacher", str(teacher)]
    launch(1, [*args, f"out={tmp_path / 'one'}"])
    launch(2, [*args, f"out={tmp_path / 'two'}"])
    assert_same_run(tmp_path / "one", tmp_path / "two", metrics=("ca", "asr", "asr_all", "ra"))


def test_ssl_pretrain_on_two_processes_matches_one(tmp_path):
    """SimCLR's negatives span the whole batch (gathered) and the head's BatchNorm1d uses the whole
    batch's statistics, so the contrastive loss is the one-process loss."""
    launch(1, [*PRETRAIN, f"out={tmp_path / 'one'}"])
    launch(2, [*PRETRAIN, f"out={tmp_path / 'two'}"])
    assert_same_run(tmp_path / "one", tmp_path / "two", metrics=("loss", "knn_acc"))


def test_two_processes_resume_after_a_kill(teacher, tmp_path):
    out = tmp_path / "teacher2"
    args = [*TEACHER, f"out={out}"]
    proc = subprocess.Popen(command(2, args), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "train_state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-training
        proc.wait()
    if (out / "metrics.json").exists():
        pytest.skip("the run finished before it could be killed")
    assert len(losses(out)) < 4
    launch(2, args)  # the same command continues from train_state.pt
    assert_same_run(teacher, out, metrics=("ca", "asr", "asr_all", "ra"))


def test_a_batch_that_does_not_split_is_one_error_line(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(command(2, [*TEACHER, "train.batch_size=63", f"out={out}"]), env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: a batch of 63 images does not split evenly over 2 processes (train.batch_size is "
                      "divided by --nproc_per_node); set train.batch_size to a multiple of 2"]
    assert not out.exists()  # refused before the run directory was opened


def test_a_one_process_command_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc = main(["defend", "train.epochs=1", f"out={tmp_path / 'run'}", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == ("error: `kdguard defend` runs as one process, but torchrun started it with "
                           "WORLD_SIZE=2; run it without torchrun; torchrun runs train-teacher, distill, "
                           "ssl-pretrain")
    assert not (tmp_path / "run").exists()
