"""Every registered KD loss through `kdguard distill`: one optimiser step on the embedded MNIST
digits, every loss term finite and logged in metrics.jsonl (issue 3's CLI smoke test)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import CLI_FAST

from kdguard.cli import main
from kdguard.distill import KD_METHODS

# 2 % of the 4,000 training digits = 80 images; batch 64 with the last partial batch dropped
# gives exactly one optimiser step per run (teacher_dir: conftest.py)
ONE_STEP = [*CLI_FAST, "clean_fraction=0.02"]


@pytest.mark.parametrize("method", [*sorted(KD_METHODS.names()), "at+kd"])
def test_one_cli_step_per_kd_method_logs_finite_terms(teacher_dir, tmp_path, method):
    out = tmp_path / method.replace("+", "_")
    assert main(["distill", f"--teacher={teacher_dir}", *ONE_STEP, "student=lenet5", f"kd.method={method}",
                 f"out={out}"]) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1
    losses = history[0]["losses"]
    assert set(method.split("+")) <= set(losses), losses  # each named term is logged separately
    assert all(math.isfinite(v) for v in losses.values()), losses
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ca", "asr", "ra"} <= set(metrics)
