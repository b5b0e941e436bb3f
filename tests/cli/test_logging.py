"""Progress lines go through logging to stderr: plain lines in a log file, none under --quiet,
debug lines under --verbose; stdout keeps the results."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CLI_FAST

import kdguard
from kdguard.cli import main
from kdguard.log import LOGGER_NAME, bar_disabled

FAST = [o for o in CLI_FAST if not o.startswith("train.progress")]  # bars on: only a terminal hides them


@pytest.fixture(autouse=True)
def _restore_kdguard_logger():
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def _distill(teacher_dir, out, *options: str) -> int:
    return main([*options, "distill", f"--teacher={teacher_dir}", *FAST, "student=lenet5",
                 "clean_fraction=0.2", f"out={out}"])


def test_a_log_file_holds_plain_lines(tmp_path):
    log = tmp_path / "run.log"
    env = {**os.environ, "PYTHONPATH": str(Path(kdguard.__file__).parents[1])}
    with log.open("w") as f:
        command = [sys.executable, "-c", "from kdguard.cli import run; run()", "train-teacher", *FAST,
                   "model=lenet5", f"out={tmp_path / 'teacher'}"]
        rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    text = log.read_text()
    assert rc == 0, text
    assert "[teacher] epoch 1/1 " in text and "run directory:" in text
    assert "\r" not in text and "\x1b" not in text


def test_progress_lines_go_to_stderr_and_results_to_stdout(teacher_dir, tmp_path, capsys):
    assert _distill(teacher_dir, tmp_path / "s") == 0
    out, err = capsys.readouterr()
    assert "[student[kd]] epoch 1/1 " in err and "epoch" not in out
    assert "CA=" in out and "run directory:" in out
    assert "DEBUG" not in err


def test_quiet_prints_no_progress_lines(teacher_dir, tmp_path, capsys):
    assert _distill(teacher_dir, tmp_path / "s", "--quiet") == 0
    out, err = capsys.readouterr()
    assert "] epoch 1/1 " not in err and "] epoch 1/1 " not in out  # (a warning may name the epoch)
    assert "run directory:" in out
    assert bar_disabled(True) is True  # and no bars


def test_verbose_adds_debug_lines(teacher_dir, tmp_path, capsys):
    assert _distill(teacher_dir, tmp_path / "s", "--verbose") == 0
    err = capsys.readouterr().err
    assert "INFO kdguard.train.trainer: [student[kd]] epoch 1/1 " in err
    assert "DEBUG kdguard.train.trainer: [student[kd]] epoch 1: lr=" in err


def test_quiet_and_verbose_together_are_a_usage_error(capsys):
    assert main(["--quiet", "--verbose", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bars_follow_progress_and_the_terminal():
    assert bar_disabled(False) is True
    logging.getLogger(LOGGER_NAME).setLevel(logging.NOTSET)  # a library user's default
    assert bar_disabled(True) is None
