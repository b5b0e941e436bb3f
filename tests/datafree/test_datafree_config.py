"""Data-free job configuration: presets, layering of YAML/overrides, validation errors."""

from __future__ import annotations

import pytest

from kdguard.commands.datafree import datafree_method_requested, translate_overrides
from kdguard.datafree import METHOD_NAMES, preset_values
from kdguard.jobs import build_datafree_job
from kdguard.errors import KDGuardError


def test_presets_set_the_reference_recipes():
    zskt = build_datafree_job(None, ["teacher=t", "method=zskt", "preset=paper"])
    assert (zskt.schedule.rounds, zskt.schedule.generator_steps, zskt.schedule.student_steps) == (80000, 1, 10)
    assert (zskt.student_optim.lr, zskt.generator_optim.lr, zskt.student_optim.grad_clip) == (2e-3, 1e-3, 5.0)
    assert zskt.zskt.kl_reduction == "mean" and zskt.zskt.at_beta == 250 and zskt.student == "wrn16_1"
    cmi = build_datafree_job(None, ["teacher=t", "method=cmi", "preset=paper"])
    assert (cmi.schedule.generator_steps, cmi.schedule.student_steps, cmi.schedule.synthesis_batch_size) == (200, 400, 256)
    assert cmi.generator.kind == "dcgan" and cmi.generator_optim.betas == [0.5, 0.999]
    assert cmi.student_optim.name == "sgd" and cmi.cmi.kd_temperature == 20
    ood = build_datafree_job(None, ["teacher=t", "method=ood", "preset=cpu"])
    assert ood.schedule.student_steps is None and ood.student == "resnet8" and ood.ood.temperature == 8


def test_user_values_win_over_the_preset(tmp_path):
    yaml = tmp_path / "job.yaml"
    yaml.write_text("method: cmi\nschedule:\n  rounds: 7\ncmi:\n  adv: 0.0\n")
    job = build_datafree_job(yaml, ["teacher=t", "schedule.generator_steps=3", "student=resnet20"])
    assert (job.method, job.schedule.rounds, job.schedule.generator_steps) == ("cmi", 7, 3)
    assert job.cmi.adv == 0.0 and job.student == "resnet20"
    assert job.schedule.student_steps == 100  # still from the cpu preset
    plain = build_datafree_job(None, ["teacher=t", "method=dfad", "preset=none"])
    assert plain.generator.kind == "zskt"  # no preset: dataclass defaults


@pytest.mark.parametrize("overrides, message", [
    (["method=zskt"], "teacher"),
    (["teacher=t", "method=gan"], "method"),
    (["teacher=t", "preset=huge"], "preset"),
    (["teacher=t", "schedule.rounds=0"], "schedule.rounds"),
    (["teacher=t", "schedule.nope=1"], "invalid configuration"),
    (["teacher=t", "student_optim.name=rmsprop"], "student_optim.name"),
    (["teacher=t", "generator.output=tanh"], "generator.output"),
    (["teacher=t", "rounds"], "key=value"),
])
def test_bad_configuration_is_one_clear_error(overrides, message):
    with pytest.raises(KDGuardError, match=message):
        build_datafree_job(None, overrides)


def test_every_method_has_both_presets():
    for method in METHOD_NAMES:
        for scale in ("cpu", "paper"):
            assert preset_values(method, scale)["schedule"]["rounds"] > 0
        assert preset_values(method, "none") == {}


def test_distill_routing_helpers():
    assert datafree_method_requested(["kd.method=zskt", "student=resnet8"]) == "zskt"
    assert datafree_method_requested(["kd.method=kd"]) is None
    assert datafree_method_requested(["kd.method=kd"], method="CMI") == "cmi"
    assert datafree_method_requested([], None) is None
    assert translate_overrides(["kd.method=ood", "out=x"]) == ["method=ood", "out=x"]


def test_yaml_boolean_words_set_choices_and_booleans_from_overrides():
    """YAML 1.1 reads off/on/yes/no as booleans: abd.mode=off would arrive as "False"."""
    job = build_datafree_job(None, ["teacher=t", "abd.mode=off", "abd.sr.amp=on", "progress=off", "amp=off"])
    assert job.abd.mode == "off" and job.amp == "off" and job.abd.sr.amp is True and job.progress is False
    job = build_datafree_job(None, ["teacher=t", "abd.mode=full", "progress=yes", "abd.mode=off"])
    assert job.abd.mode == "off" and job.progress is True  # the last override of a key wins


def test_an_unquoted_off_in_a_yaml_file_is_refused_with_the_fix(tmp_path):
    yaml = tmp_path / "job.yaml"
    yaml.write_text("teacher: t\nabd:\n  mode: off\n")
    with pytest.raises(KDGuardError, match="abd.mode 'False'") as exc:
        build_datafree_job(yaml)
    assert "quote it (mode: 'off')" in exc.value.fix
    yaml.write_text("teacher: t\nabd:\n  mode: yes\n")
    with pytest.raises(KDGuardError, match="abd.mode 'True'") as exc:
        build_datafree_job(yaml)
    assert "quote it (mode: 'off')" in exc.value.fix  # 'on' is no mode: the example is a valid one
    yaml.write_text("teacher: t\nabd:\n  mode: 'off'\n")
    assert build_datafree_job(yaml).abd.mode == "off"
