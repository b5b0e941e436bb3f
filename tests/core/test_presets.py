"""Shipped presets and protocols: every YAML file under kdguard/configs/ loads into its schema, and
the values equal the ones kdguard shipped as Python dicts before (presets_expected.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kdguard.attacks import ATTACK_PRESETS, AttackPreset
from kdguard.config import TrainConfig
from kdguard.datafree import METHOD_NAMES, DataFreeJob, build_datafree_job, preset_values
from kdguard.defenses.robustkd.presets import PAIRS, PAPER_TRAINING, PairPreset
from kdguard.errors import KDGuardError
from kdguard.presets import load_table, shipped_files

EXPECTED = json.loads((Path(__file__).parent / "presets_expected.json").read_text())

#: shipped file → (schema, every required field set)
SCHEMAS = {**{f"datafree/{m}.yaml": (DataFreeJob, False) for m in METHOD_NAMES},
           "attacks.yaml": (AttackPreset, True),
           "robustkd/pairs.yaml": (PairPreset, True),
           "robustkd/training.yaml": (TrainConfig, False)}


def _exact(value):
    # json text keeps int vs float apart (5 vs 5.0), which == does not
    return json.dumps(value, sort_keys=True)


def test_every_shipped_yaml_loads_into_its_schema():
    from kdguard.suites import load_suite

    tables = [f for f in shipped_files() if not f.startswith("suites/")]
    assert tables == sorted(SCHEMAS)
    for name, (schema, complete) in SCHEMAS.items():
        assert load_table(name, schema, complete=complete)
    for name in shipped_files():  # suites have their own schema (and tests in tests/suites)
        if name.startswith("suites/"):
            assert load_suite(name[len("suites/"):-len(".yaml")]).spec.stages


@pytest.mark.parametrize("scale", ["cpu", "paper", "none"])
def test_datafree_presets_equal_the_former_dicts(scale):
    for method in METHOD_NAMES:
        assert _exact(preset_values(method, scale)) == _exact(EXPECTED["datafree"][scale][method])


def test_attack_pairs_and_training_presets_equal_the_former_dicts():
    assert _exact({k: dataclasses.asdict(v) for k, v in ATTACK_PRESETS.items()}) == _exact(EXPECTED["attacks"])
    assert _exact({k: dataclasses.asdict(v) for k, v in PAIRS.items()}) == _exact(EXPECTED["robustkd_pairs"])
    assert _exact(PAPER_TRAINING) == _exact(EXPECTED["robustkd_paper_training"])


def test_a_preset_builds_a_job_with_its_values():
    job = build_datafree_job(overrides=["teacher=t", "method=cmi", "preset=cpu"])
    assert (job.student, job.schedule.rounds, job.cmi.bank_size) == ("resnet8", 50, 8192)
    assert list(job.generator_optim.betas) == [0.5, 0.999]


def test_an_unknown_key_or_wrong_type_in_a_preset_file_is_an_error(monkeypatch, tmp_path):
    import kdguard.presets as presets

    root = tmp_path / "kdguard"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "bad.yaml").write_text("one: {schedule: {roundz: 3}}\n")
    (root / "configs" / "typed.yaml").write_text("one: {schedule: {rounds: many}}\n")
    monkeypatch.setattr(presets, "files", lambda _package: root)
    with pytest.raises(KDGuardError, match=r"bad\.yaml.*entry 'one'.*roundz"):
        load_table("bad.yaml", DataFreeJob)
    with pytest.raises(KDGuardError, match=r"typed\.yaml.*entry 'one'"):
        load_table("typed.yaml", DataFreeJob)
    with pytest.raises(KDGuardError, match="ships no config file 'none.yaml'"):
        load_table("none.yaml", DataFreeJob)
    with pytest.raises(KDGuardError, match="does not set 'trigger'"):
        (root / "configs" / "partial.yaml").write_text("one: {poison_rate: 0.2}\n")
        load_table("partial.yaml", AttackPreset, complete=True)
