"""The tiny suite under Ray (a local Ray instance with 2 CPUs) gives the local engine's records.

Seed 0 only (2 triggers × 2 methods: 6 stages per engine), to keep the file near a minute; the
local engine runs both seeds in test_suite_local.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="the Ray engine needs the ray extra (pip install 'kdguard[ray]')")


def test_ray_engine_gives_the_local_records(tmp_path, records):
    from kdguard.suites import load_suite, plan_suite, run_suite

    suite = load_suite("tiny")
    local = run_suite(plan_suite(suite, seeds=[0], out=tmp_path / "local"), engine="local",
                      ledger=tmp_path / "local_results")
    ray = run_suite(plan_suite(suite, seeds=[0], out=tmp_path / "ray"), engine="ray",
                    ledger=tmp_path / "ray_results", num_cpus=2)
    assert (ray.ran, ray.reused) == (local.ran, local.reused) == (6, 2)  # a teacher per trigger, shared
    ray_records, local_records = records(tmp_path / "ray_results"), records(tmp_path / "local_results")
    assert sorted(ray_records) == [(c, 0) for c in ("badnets/kd", "badnets/zskt", "blend/kd", "blend/zskt")]
    assert ray_records == local_records
