"""Fixtures for untrusted-teacher tests: a real tiny kdguard teacher run, copied per test."""

from __future__ import annotations

import shutil

import pytest

from helpers import CLI_FAST

from kdguard.cli import main


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A LeNet-5 teacher (BadNets 10 %, one epoch on the embedded MNIST digits)."""
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train-teacher", *CLI_FAST, "model=lenet5", "attack.name=badnets", f"out={out}"]) == 0
    return out


@pytest.fixture
def teacher_copy(teacher_run, tmp_path):
    """A copy of :func:`teacher_run` this test may tamper with."""
    dst = tmp_path / "teacher"
    shutil.copytree(teacher_run, dst)
    return dst
