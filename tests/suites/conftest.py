"""The tiny suite (embedded MNIST, 2 triggers × 2 methods × 2 seeds), run once per test module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdguard.suites import comparable


def ledger_records(ledger: Path, suite: str = "tiny", scale: str = "cpu") -> dict[tuple[str, int], dict]:
    """(cell, seed) → the record, without its machine- and time-dependent fields."""
    out = {}
    for path in sorted((ledger / suite / scale).rglob("s*.json")):
        r = json.loads(path.read_text())
        out[(r["cell"], r["seed"])] = comparable(r)
    return out


@pytest.fixture
def records():
    """:func:`ledger_records`."""
    return ledger_records


@pytest.fixture(scope="module")
def tiny_local(tmp_path_factory):
    """The whole tiny suite under the local engine: (stage cache, ledger, SuiteRunResult)."""
    from kdguard.suites import load_suite, plan_suite, run_suite

    base = tmp_path_factory.mktemp("tiny_local")
    plan = plan_suite(load_suite("tiny"), out=base / "runs")
    result = run_suite(plan, engine="local", ledger=base / "results")
    return base / "runs", base / "results", result
