"""Run directories: identity, resume policy, lock, output-path errors, atomic writes, history files,
schedule extension and the chance-level checks (kdguard.rundir, kdguard.io, the training loops)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, make_blobs

from kdguard import rundir
from kdguard.config import AttackConfig, DistillJob, OptimConfig, TeacherJob, TrainConfig
from kdguard.errors import KDGuardError
from kdguard.io import atomic_write, write_text
from kdguard.metrics import at_chance, backdoor_metrics
from kdguard.report import metrics_table, write_run_report
from kdguard.rundir import open_run, run_policy
from kdguard.train import Trainer
from kdguard.optim import schedule_progress
from kdguard.train.trainer import HISTORY_FILE, STATE_FILE, ChanceAccuracyWarning, sync_history_file


def _teacher(**kw) -> TeacherJob:
    job = TeacherJob(out="unused")
    for k, v in kw.items():
        setattr(job, k, v)
    return job


def _work(out: Path) -> None:
    """Something a run computed (a run directory with work in it is protected)."""
    (out / "train_state.pt").write_bytes(b"state")


# -- identity ------------------------------------------------------------------------------------

def test_ignored_keys_leave_the_fingerprint_alone_and_results_keys_change_it():
    base = rundir.job_record(_teacher())
    same = _teacher(out="elsewhere", train=TrainConfig(progress=False, device="cpu", eval_batch_size=7))
    same.data.root = "/data/elsewhere"
    assert rundir.job_record(same)["fingerprint"] == base["fingerprint"]
    other = rundir.job_record(_teacher(attack=AttackConfig(name="blend")))
    assert other["fingerprint"] != base["fingerprint"]
    assert rundir.differences(base, other) == [("attack.name", "badnets", "blend")]
    assert rundir.describe(rundir.differences(base, other)) == "attack.name: badnets -> blend"
    assert "out" not in base["config"] and "root" not in base["config"]["data"]
    assert base["kdguard"] and base["job"] == "TeacherJob"


def test_parent_weights_enter_by_digest_not_by_path(tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-1")
    c.write_bytes(b"weights-2")
    rec = {p.name: rundir.job_record(DistillJob(teacher=str(p)), parents=("teacher",)) for p in (a, b, c)}
    assert rec["a.safetensors"]["fingerprint"] == rec["b.safetensors"]["fingerprint"]  # moved, same weights
    diffs = rundir.differences(rec["a.safetensors"], rec["c.safetensors"])
    assert [d[0] for d in diffs] == ["teacher weights"]
    assert "c.safetensors" in rundir.describe(diffs)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"weights-2")  # a directory means its model.safetensors
    assert rundir.weights_digest(run_dir) == rundir.weights_digest(c)


# -- the policy ----------------------------------------------------------------------------------

def test_same_settings_resume_and_other_settings_are_refused_naming_the_keys(tmp_path):
    out = tmp_path / "run"
    with run_policy():
        assert open_run(out, _teacher()) == out
    _work(out)
    with run_policy():
        open_run(out, _teacher(out="x", train=TrainConfig(progress=False)))  # same run
        with pytest.raises(KDGuardError) as e:
            open_run(out, _teacher(attack=AttackConfig(name="blend"), model="resnet8"))
    msg = str(e.value)
    assert "attack.name: badnets -> blend" in msg and "model: lenet5 -> resnet8" in msg
    assert "--overwrite" in msg and str(out) in msg and "\n" not in msg
    assert (out / "train_state.pt").exists()  # nothing was touched


def test_overwrite_removes_the_old_run_first(tmp_path):
    out = tmp_path / "run"
    with run_policy():
        open_run(out, _teacher())
    _work(out)
    (out / "sub").mkdir()
    (out / "sub" / "f").write_text("x")
    with run_policy(overwrite=True):
        open_run(out, _teacher(attack=AttackConfig(name="blend")))
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.yaml", "run.json", rundir.LOCK_FILE])
    record = rundir.read_run_record(out)
    assert record["config"]["attack"]["name"] == "blend"
    assert "name: blend" in (out / "config.yaml").read_text()


def test_resume_lengthens_training_only_and_records_it(tmp_path):
    out = tmp_path / "run"
    with run_policy():
        open_run(out, _teacher(train=TrainConfig(epochs=3)))
    _work(out)
    with run_policy(), pytest.raises(KDGuardError, match=r"train\.epochs: 3 -> 5.*--resume"):
        open_run(out, _teacher(train=TrainConfig(epochs=5)))
    with run_policy(resume=True):
        open_run(out, _teacher(train=TrainConfig(epochs=5)))
    ext = rundir.read_run_record(out)["extensions"]
    assert [(e["key"], e["from"], e["to"]) for e in ext] == [("train.epochs", 3, 5)]
    with run_policy(resume=True), pytest.raises(KDGuardError, match=r"train\.epochs: 5 -> 4.*only lengthens"):
        open_run(out, _teacher(train=TrainConfig(epochs=4)))
    with run_policy(resume=True), pytest.raises(KDGuardError, match=r"attack\.target: 0 -> 1"):
        open_run(out, _teacher(train=TrainConfig(epochs=6), attack=AttackConfig(target=1)))
    with pytest.raises(KDGuardError, match="both"):
        with run_policy(resume=True, overwrite=True):
            pass


def test_foreign_and_older_directories_are_protected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with run_policy():
        open_run(empty, _teacher())  # an empty directory is fine
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with run_policy(), pytest.raises(KDGuardError, match=r"no run\.json \(notes\.txt\)"):
        open_run(foreign, _teacher())
    with run_policy(resume=True), pytest.raises(KDGuardError, match="--overwrite"):
        open_run(foreign, _teacher())
    assert (foreign / "notes.txt").read_text() == "mine"
    # a run of an older kdguard: config.yaml and results, no run.json; --resume adopts it when
    # its settings are the job's
    from kdguard.config import to_yaml

    older = tmp_path / "older"
    older.mkdir()
    (older / "config.yaml").write_text(to_yaml(_teacher(out=str(older))))
    _work(older)
    with run_policy(), pytest.raises(KDGuardError, match="older kdguard"):
        open_run(older, _teacher())
    with run_policy(resume=True), pytest.raises(KDGuardError, match="attack.name: badnets -> wanet"):
        open_run(older, _teacher(attack=AttackConfig(name="wanet")))
    with run_policy(resume=True):
        open_run(older, _teacher())
    assert "adopted" in rundir.read_run_record(older)


def test_a_run_that_computed_nothing_yet_takes_new_settings(tmp_path):
    out = tmp_path / "run"
    with run_policy():
        open_run(out, _teacher(model="resnet21"))  # say the job then failed on the model name
        open_run(out, _teacher())
    assert rundir.read_run_record(out)["config"]["model"] == "lenet5"


def test_overwrite_never_empties_home_or_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    with run_policy(overwrite=True), pytest.raises(KDGuardError, match="working directory"):
        open_run(".", _teacher())
    assert (tmp_path / "keep.txt").exists()


# -- the lock ------------------------------------------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1], timeout=0)
    lock.acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / rundir.LOCK_FILE)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_directory_locked_by_another_process_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with run_policy(), pytest.raises(KDGuardError) as e:
            open_run(out, _teacher())
    finally:
        proc.kill()
        proc.wait()
    assert "in use by another kdguard process" in str(e.value) and str(out) in str(e.value)
    assert "\n" not in str(e.value) and not (out / "run.json").exists()


def test_the_lock_is_held_during_the_run_and_released_after_it_also_on_error(tmp_path):
    out = tmp_path / "run"
    probe = [sys.executable, "-c", "import sys; from filelock import FileLock, Timeout\n"
             "try:\n    FileLock(sys.argv[1], timeout=0).acquire(); print('free')\n"
             "except Timeout:\n    print('held')", str(out / rundir.LOCK_FILE)]
    state = lambda: subprocess.run(probe, capture_output=True, text=True).stdout.strip()  # noqa: E731
    with pytest.raises(RuntimeError):
        with run_policy():
            open_run(out, _teacher())
            assert state() == "held"
            raise RuntimeError("the job failed")
    assert state() == "free"


# -- the output path -----------------------------------------------------------------------------

def test_bad_output_paths_are_one_line_errors(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, fragment in ((a_file / "run", "which is a file"), (a_file, "is a file"),
                          ("/proc/kdguard_run", "/proc"), ("/sys/kdguard_run", "/sys")):
        with run_policy(), pytest.raises(KDGuardError, match=fragment) as e:
            open_run(out, _teacher())
        assert "out=" in str(e.value) and "\n" not in str(e.value)

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)  # a read-only location (tests may run as root)
    with run_policy(), pytest.raises(KDGuardError, match="cannot write run directory .*Permission denied"):
        open_run(tmp_path / "ro" / "run", _teacher())


def test_tilde_is_expanded_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with run_policy():
        out = open_run("~/runs/x", _teacher())
    assert out == tmp_path / "runs" / "x" and (out / "run.json").exists()
    assert not Path("~").exists()


# -- atomic writes -------------------------------------------------------------------------------

def test_atomic_write_fsyncs_and_leaves_an_ordinary_file_mode(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real(fd)))
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert len(synced) == 2 and any(stat.S_ISDIR(m) for m in synced)  # the file, then its directory
    assert not list(tmp_path.glob(".a.txt.*"))


def test_stale_temporaries_of_a_killed_process_are_removed_on_reopen(tmp_path):
    out = tmp_path / "run"
    with run_policy():
        open_run(out, _teacher())
    _work(out)
    (out / ".train_state.pt.abc123.tmp").write_bytes(b"half")
    with run_policy():
        open_run(out, _teacher())
    assert not (out / ".train_state.pt.abc123.tmp").exists() and (out / "train_state.pt").exists()


# -- training loops: history file, schedule extension, chance ------------------------------------

def _cfg(epochs: int, lr: float = 0.05, schedule: str = "cosine") -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=16, progress=False, device="cpu",
                       optim=OptimConfig(lr=lr, schedule=schedule))


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_history_file_matches_the_restored_state_after_a_kill_between_the_writes(tmp_path):
    blobs = make_blobs(n=64)
    torch.manual_seed(0)
    init = TinyNet().state_dict()
    saved = {}

    def keep_state_after_epoch_1(model):  # called before epoch 2's state is written
        if (tmp_path / STATE_FILE).exists() and not saved:
            saved["state"] = (tmp_path / STATE_FILE).read_bytes()
        return {}

    full = TinyNet()
    full.load_state_dict(init)
    Trainer(full, _cfg(2), run_dir=tmp_path, seed=0, evaluate=keep_state_after_epoch_1).fit(blobs.images, blobs.labels)
    assert [r["epoch"] for r in _lines(tmp_path / HISTORY_FILE)] == [1, 2]
    # killed after epoch 2's history line but before its state: one line too many
    (tmp_path / STATE_FILE).write_bytes(saved["state"])
    resumed = TinyNet()
    trainer = Trainer(resumed, _cfg(2), run_dir=tmp_path, seed=0)
    trainer.try_resume()
    assert trainer.start_epoch == 1
    hist = trainer.fit(blobs.images, blobs.labels, resume=False)
    lines = _lines(tmp_path / HISTORY_FILE)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines == [{"stage": "train", **asdict(r)} for r in hist]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # and a line missing (killed between the state and its line) comes back
    (tmp_path / HISTORY_FILE).write_text(json.dumps(lines[0]) + "\n")
    Trainer(TinyNet(), _cfg(2), run_dir=tmp_path, seed=0).fit(blobs.images, blobs.labels)
    assert _lines(tmp_path / HISTORY_FILE) == lines


def test_sync_keeps_other_stages_and_drops_a_cut_line(tmp_path):
    path = tmp_path / HISTORY_FILE
    path.write_text('{"stage": "teacher", "epoch": 1}\n{"stage": "student", "epoch": 1}\n{"stage": "stu')
    sync_history_file(path, "student", [{"epoch": 1}, {"epoch": 2}])
    assert _lines(path) == [{"stage": "teacher", "epoch": 1}, {"stage": "student", "epoch": 1},
                            {"stage": "student", "epoch": 2}]


class _LRTrainer(Trainer):
    seen: list[float]

    def _step_losses(self, x, y, index):  # called once per step, after the scheduler set the lr
        self.seen.append(self.optimizer.param_groups[0]["lr"])
        return super()._step_losses(x, y, index)


def test_resume_with_more_epochs_continues_the_schedule_without_a_jump(tmp_path):
    blobs = make_blobs(n=64)  # 4 steps per epoch

    def stop_in_epoch_3(model, calls=[]):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the state holds epoch 2
        return {}

    first = _LRTrainer(TinyNet(), _cfg(4), run_dir=tmp_path, seed=0, evaluate=stop_in_epoch_3)
    first.seen = []
    with pytest.raises(KeyboardInterrupt):
        first.fit(blobs.images, blobs.labels)
    before = first.seen[:8]  # the steps of epochs 1-2 (epoch 3's were redone)
    second = _LRTrainer(TinyNet(), _cfg(8), run_dir=tmp_path, seed=0)
    second.seen = []
    second.fit(blobs.images, blobs.labels)
    lrs = before + second.seen
    assert len(lrs) == 8 * 4
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), lrs  # never up
    # continuous: the first resumed step sits where the 4-epoch cosine was going next
    p = 8 / 16
    assert second.seen[0] == pytest.approx(0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * p)).item()))
    assert second.seen[-1] < 0.05 * 0.01  # annealed to ~0 at the new end
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["total_epochs"] == 8 and state["schedule"] == [{"epoch": 2, "progress": 0.5}]
    history = [r["lr"] for r in _lines(tmp_path / HISTORY_FILE)]
    assert [r["epoch"] for r in _lines(tmp_path / HISTORY_FILE)] == list(range(1, 9))
    assert all(b <= a for a, b in zip(history, history[1:]))


def test_schedule_progress_stretches_the_rest_and_chains():
    assert schedule_progress(5, 10) == 0.5
    seg = [{"epoch": 2, "progress": 0.5}]
    assert schedule_progress(2, 12, seg) == 0.5 and schedule_progress(12, 12, seg) == 1.0
    assert schedule_progress(7, 12, seg) == pytest.approx(0.75)
    seg2 = [*seg, {"epoch": 7, "progress": 0.75}]
    assert schedule_progress(7, 22, seg2) == 0.75 and schedule_progress(22, 22, seg2) == 1.0


def test_data_free_rounds_extension_stretches_exactly():
    from kdguard.datafree.loop import DataFreeLoop

    loop = DataFreeLoop.__new__(DataFreeLoop)
    loop.rounds, loop.segments = 20, [{"round": 5, "progress": [1, 2]}]  # 10-round run resumed at 5
    assert loop.progress(5) == Fraction(1, 2) and loop.progress(20) == 1
    assert loop.progress(10) == Fraction(1, 2) + Fraction(1, 2) * Fraction(5, 15)
    values = [loop.progress(r) for r in range(5, 21)]
    assert values == sorted(values)


def test_a_learning_rate_that_drives_training_to_chance_warns():
    blobs = make_blobs(n=128)
    torch.manual_seed(0)
    with pytest.warns(ChanceAccuracyWarning, match=r"chance level.*train\.optim\.lr=9"):
        Trainer(TinyNet(), _cfg(3, lr=9.0), seed=0).fit(blobs.images, blobs.labels)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChanceAccuracyWarning)
        hist = Trainer(TinyNet(), _cfg(5, lr=0.2), seed=0).fit(blobs.images, blobs.labels)
    assert hist[-1].train_acc > 0.9


def test_a_slow_start_of_a_long_training_does_not_warn():
    """A KD student at a high temperature can sit at chance for its first epochs (the demo's does
    for 3 of 40): only an epoch past a fifth of the training, or the last, is judged."""
    from kdguard.train.trainer import EpochRecord

    trainer = Trainer(TinyNet(), _cfg(40, lr=0.05), seed=0)
    at = lambda epoch: EpochRecord(epoch=epoch, lr=0.05, losses={}, train_acc=0.1, seconds=0.0)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChanceAccuracyWarning)
        for epoch in range(1, 8):
            trainer._check_chance(at(epoch), 10)
    with pytest.warns(ChanceAccuracyWarning, match="epoch 8"):
        trainer._check_chance(at(8), 10)


def test_collapsed_flag_and_report(tmp_path):
    assert at_chance(0.10, 10) and at_chance(0.149, 10) and not at_chance(0.15, 10)
    assert at_chance(0.54, 2) and not at_chance(0.56, 2)  # binary: a tenth of the way to perfect
    assert at_chance(0.5, None) is None
    labels = torch.arange(10).repeat(10)
    flat = backdoor_metrics(labels, torch.zeros_like(labels), num_classes=10).to_dict()
    good = backdoor_metrics(labels, labels.clone(), num_classes=10).to_dict()
    assert flat["collapsed"] is True and good["collapsed"] is False and flat["num_classes"] == 10
    assert backdoor_metrics(labels, labels.clone()).collapsed is None  # K unknown: not judged
    table = metrics_table([("student", "lenet5", flat), ("teacher", "lenet5", good)])
    assert "10.00 (chance)" in table and "100.00 (chance)" not in table
    write_run_report(tmp_path, title="t", rows=[("student (kd)", "lenet5", flat)], history={})
    report = (tmp_path / "report.md").read_text()
    assert "Collapsed to chance accuracy (chance: 10.0 % for 10 classes): student (kd) (10.00 %)" in report


def test_evaluation_reports_collapsed_from_the_model_width():
    from kdguard.metrics import evaluate_backdoor

    blobs = make_blobs(n=32)
    net = TinyNet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.fc.bias[2] = 1.0  # always class 2
    m = evaluate_backdoor(net, blobs.images, blobs.labels)
    assert m.num_classes == 4 and m.ca == 0.25 and m.collapsed is True


def test_policy_released_locks_let_a_copy_continue(tmp_path):
    # a run renamed or copied while this process held its lock (benchmarks do both) can be reopened
    a = tmp_path / "a"
    open_run(a, _teacher())  # no policy block: held until the next run of this process
    _work(a)
    b = tmp_path / "b"
    a.rename(b)
    open_run(b, _teacher())
    c = tmp_path / "c"
    shutil.copytree(b, c)
    rundir.adopt_copy(c, _teacher(attack=AttackConfig(name="blend")), source=b)
    with run_policy():
        open_run(c, _teacher(attack=AttackConfig(name="blend")))
    assert rundir.read_run_record(c)["forked_from"]["path"] == str(b)
