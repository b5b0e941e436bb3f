"""The tiny suite under Ray (a local Ray instance with 2 CPUs) gives the local engine's records."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="the Ray engine needs the ray extra (pip install 'kdguard[ray]')")


def test_ray_engine_gives_the_local_records(tiny_local, tmp_path, records):
    from kdguard.suites import load_suite, plan_suite, run_suite

    _, local_ledger, local = tiny_local
    plan = plan_suite(load_suite("tiny"), out=tmp_path / "runs")
    result = run_suite(plan, engine="ray", ledger=tmp_path / "results", num_cpus=2)
    assert (result.ran, result.reused) == (local.ran, local.reused) == (12, 4)
    ray_records, local_records = records(tmp_path / "results"), records(local_ledger)
    assert len(ray_records) == 8
    assert ray_records == local_records
