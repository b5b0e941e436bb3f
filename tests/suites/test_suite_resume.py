"""A suite whose process is killed (SIGKILL) mid-stage finishes on the next run, with the records
of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _suite_cmd(out: Path, ledger: Path) -> list[str]:
    return [sys.executable, "-m", "kdguard", "-q", "suite", "run", "tiny", "--only", "badnets/zskt", "--seeds", "0",
            "--out", str(out), "--ledger", str(ledger)]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_killed_suite_resumes_to_the_same_records(tmp_path, records):
    ref_out, ref_ledger = tmp_path / "ref", tmp_path / "ref_results"
    subprocess.run(_suite_cmd(ref_out, ref_ledger), env=_env(), check=True, capture_output=True, timeout=300)
    out, ledger = tmp_path / "runs", tmp_path / "results"
    proc = subprocess.Popen(_suite_cmd(out, ledger), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_in = None
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            # the teacher has saved its first epoch and is not done: kill it there
            for stage in (out / "stages").glob("teacher-*") if (out / "stages").exists() else ():
                if (stage / "train_state.pt").exists() and not (stage / "suite_stage.json").exists():
                    proc.send_signal(signal.SIGKILL)
                    killed_in = stage
                    break
            if killed_in:
                break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
    assert killed_in is not None, "the suite finished before it could be killed mid-stage"
    assert not (ledger / "tiny").exists() or not records(ledger)
    done = subprocess.run(_suite_cmd(out, ledger), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 ran" in done.stdout  # the interrupted teacher and the student
    assert records(ledger) == records(ref_ledger) and len(records(ledger)) == 1
