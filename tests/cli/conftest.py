"""The CLI tests' shared poisoned teacher: LeNet-5, BadNets 10 %, 1 epoch on the embedded MNIST
digits, trained once per pytest session through `kdguard train-teacher`."""

from __future__ import annotations

import pytest

from helpers import CLI_FAST

from kdguard.cli import main


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    rc = main(["train-teacher", *CLI_FAST, "model=lenet5", "attack.name=badnets", "attack.poison_rate=0.1",
               f"out={out}"])
    assert rc == 0
    return out
