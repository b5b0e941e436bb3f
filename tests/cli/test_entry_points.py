"""The CLI's entry points: a bare ``kdguard`` prints its help once and exits 0; ``python -m
kdguard`` is the same CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kdguard.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_bare_kdguard_prints_the_help_once(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count("Usage:") == 1 and "train-teacher" in out


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "kdguard", "list"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "datasets:" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "kdguard", "no-such-command"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and len(bad.stderr.splitlines()) == 1
