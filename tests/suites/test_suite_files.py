"""Suite files are validated before anything runs: a bad one is one line `error: ...` and exit 2.
Every shipped suite loads and plans at each of its scales."""

from __future__ import annotations

import textwrap

import pytest

from helpers import cli_error
from kdguard.suites import load_suite, plan_suite, shipped_suites

GOOD = """
seeds: [0]
stages:
  teacher:
    job: teacher
    config: {data: {name: mnist_embedded}, model: lenet5, attack: {name: badnets}, train: {epochs: 1}}
  kd:
    job: distill
    parent: teacher
    config: {student: lenet5, kd: {method: kd}}
methods: [kd]
matrix:
  trigger:
    badnets: {teacher: {attack: {name: badnets}}}
"""

BAD = {
    "unknown top-level key": (GOOD + "colour: red\n", "colour"),
    "unknown stage key": (GOOD.replace("parent: teacher", "parent: teacher\n    cpus: 2"), "cpus"),
    "unknown job setting": (GOOD.replace("model: lenet5", "modle: lenet5"), "modle"),
    "wrongly typed setting": (GOOD.replace("epochs: 1", "epochs: many"), "'many'"),
    "unknown job kind": (GOOD.replace("job: distill", "job: distil"), "distil"),
    "unknown trigger": (GOOD.replace("badnets: {teacher: {attack: {name: badnets}}}",
                                     "badnets: {teacher: {attack: {name: badnetz}}}"), "badnetz"),
    "unknown KD method": (GOOD.replace("method: kd}", "method: kdd}"), "kdd"),
    "unknown data-free method": (GOOD.replace("job: distill", "job: datafree").replace(
        "config: {student: lenet5, kd: {method: kd}}", "config: {method: zsk}"), "zsk"),
    "unknown parent": (GOOD.replace("parent: teacher", "parent: teachr"), "teachr"),
    "unknown method": (GOOD.replace("methods: [kd]", "methods: [kd, zskt]"), "zskt"),
    "unknown matrix target": (GOOD.replace("badnets: {teacher:", "badnets: {techer:"), "techer"),
    "circular parents": (GOOD.replace("job: teacher", "job: distill\n    parent: kd"), "circle"),
    "import path": (GOOD.replace("model: lenet5", "model: 'os.path:join'"), "import path"),
    "interpolation": (GOOD.replace("model: lenet5", "model: '${oc.env:HOME}'"), "interpolation"),
    "not YAML": ("stages: [unclosed\n", "YAML"),
    "matrix after: unknown stage": (GOOD + "    other: {after: {teachr: {attack.params.file: kd}}}\n", "teachr"),
    "matrix after: unknown reference": (GOOD + "    other: {after: {teacher: {attack.params.file: kdd/x}}}\n", "kdd"),
    "matrix after: not a mapping": (GOOD + "    other: {after: [teacher]}\n", "not a mapping"),
    "matrix after: circle": (GOOD + "    other: {after: {teacher: {attack.params.file: kd/model.safetensors}}}\n",
                             "circle"),
    "reserved stage name": (GOOD.replace("  kd:\n", "  after:\n").replace("[kd]", "[after]"), "reserved"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_suite_file_is_one_line_and_exit_2(case, tmp_path, capsys):
    text, needle = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    err = cli_error(["suite", "run", str(path), "--dry-run", "--out", str(tmp_path / "runs")], capsys)
    assert needle in err, err


def test_good_suite_file_plans(tmp_path, capsys):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    plan = plan_suite(load_suite(str(path)), out=tmp_path)
    assert [c.cell for c in plan.cells] == ["badnets/kd"] and len(plan.stages) == 2


@pytest.mark.parametrize("args, needle", [
    (["suite", "run", "no-such-suite", "--dry-run"], "unknown suite"),
    (["suite", "run", "tiny", "--dry-run", "--seeds", "0,x"], "--seeds"),
    (["suite", "run", "tiny", "--dry-run", "--only", "nothing/*"], "matches no cell"),
    (["suite", "run", "tiny", "--dry-run", "--scale", "huge"], "no scale"),
    (["suite", "run", "tiny", "--engine", "spark", "--seeds", "0", "--only", "none*"], "matches no cell"),
    (["suite", "report", "tiny.yaml"], "does not exist"),
])
def test_bad_options_are_one_line(args, needle, capsys):
    assert needle in cli_error(args, capsys)


def test_unknown_engine(tmp_path, capsys):
    assert "unknown engine" in cli_error(["suite", "run", "tiny", "--engine", "spark", "--out", str(tmp_path),
                                          "--ledger", str(tmp_path / "l")], capsys)


@pytest.mark.parametrize("name", shipped_suites())
def test_shipped_suites_plan_at_every_scale(name, tmp_path):
    suite = load_suite(name)
    for scale in suite.scale_names:
        plan = plan_suite(suite, scale=scale, out=tmp_path)
        assert plan.cells and plan.stages
        # a stage shared by several cells is planned once
        assert len(plan.stages) <= sum(len(c.stages) for c in plan.cells)


# A matrix value may feed a stage from stages the other values do not have: the learned-trigger
# row of the robustkd suite (a clean teacher -> its optimised trigger -> the poisoned teacher).
LEARNED = """
seeds: [0]
stages:
  teacher:
    job: teacher
    config: &t {data: {name: mnist_embedded, val_fraction: 0.05}, model: lenet5, attack: {target: 0},
                train: {epochs: 1, batch_size: 64, progress: false}}
  clean_teacher:
    job: teacher
    config: {<<: *t, attack: {name: null}}
  trigger:
    job: robustkd-trigger
    parent: clean_teacher
    config: {fraction: 0.05, epochs: 1, progress: false}
  kd:
    job: distill
    parent: teacher
    config: {data: {name: mnist_embedded, val_fraction: 0.05}, student: lenet5, clean_fraction: 0.1,
             kd: {method: kd}, train: {epochs: 1, batch_size: 64, progress: false}}
methods: [kd]
matrix:
  attack:
    badnets: {teacher: {attack: {name: badnets}}}
    learned:
      teacher: {attack: {name: robustkd_blend}}
      after: {teacher: {attack.params.file: trigger/trigger.safetensors}}
"""


def test_matrix_after_adds_stages_to_its_cells_only(tmp_path):
    path = tmp_path / "learned.yaml"
    path.write_text(LEARNED)
    plan = plan_suite(load_suite(str(path)), out=tmp_path / "runs")
    chains = {c.cell: c.stage_names for c in plan.cells}
    assert chains == {"badnets/kd": ["teacher", "kd"],
                      "learned/kd": ["clean_teacher", "trigger", "teacher", "kd"]}
    learned = plan.cells[1]
    trigger, teacher = plan.stages[learned.stages[1]], plan.stages[learned.stages[2]]
    assert teacher.parents == [trigger.key]
    assert f'attack.params.file="{trigger.out}/trigger.safetensors"' in teacher.overrides
    assert teacher.key != plan.cells[0].stages[0]


def test_matrix_after_runs_the_learned_trigger_cell(tmp_path):
    import json

    from kdguard.suites import run_suite

    path = tmp_path / "learned.yaml"
    path.write_text(LEARNED)
    plan = plan_suite(load_suite(str(path)), only="learned/kd", out=tmp_path / "runs")
    run_suite(plan, engine="local", ledger=tmp_path / "results")
    record = json.loads((tmp_path / "results" / "learned" / "cpu" / "learned" / "kd" / "s0.json").read_text())
    assert [s["name"] for s in record["stages"]] == ["clean_teacher", "trigger", "teacher", "kd"]
    teacher_dir = plan.stage_dir(plan.cells[0].stages[2])
    manifest = json.loads((teacher_dir / "manifest.json").read_text())
    attack = manifest["attack"]["config"]
    assert attack["name"] == "robustkd_blend" and attack["params"]["file"].endswith("trigger.safetensors")
    assert 0.0 <= record["metrics"]["asr"] <= 1.0


# Forks of one stopped data-free run share its first rounds: SR variants continue one ZSKT prefix.
FORKS = """
seeds: [0]
stages:
  teacher:
    job: teacher
    seeded: false
    config: {data: {name: mnist_embedded, val_fraction: 0.05}, model: lenet5, attack: {name: badnets},
             train: {epochs: 1, batch_size: 64, progress: false}}
  prefix:
    job: datafree
    parent: teacher
    config: {method: zskt, preset: cpu, student: lenet5, data: {name: mnist_embedded},
             schedule: {rounds: 6, stop_after: 4, student_steps: 2, generator_steps: 1, batch_size: 16},
             generator: {width: 8}, monitor: {every: 2, grid_every: 0, checkpoint_every: 1}, progress: false}
  fork:
    job: datafree-fork
    parent: prefix
    config: {schedule: {stop_after: null}}
methods: [fork]
matrix:
  variant:
    undefended: {}
    sr: {fork: {abd: {mode: sr, sr: {phase: 0.34}}}}
"""


def test_datafree_forks_continue_one_prefix(tmp_path):
    import json

    from kdguard.datafree.loop import saved_round
    from kdguard.suites import run_suite

    path = tmp_path / "forks.yaml"
    path.write_text(FORKS)
    plan = plan_suite(load_suite(str(path)), out=tmp_path / "runs")
    result = run_suite(plan, engine="local", ledger=tmp_path / "results")
    prefix = {c.stages[1] for c in plan.cells}
    assert len(prefix) == 1  # one prefix for both variants
    prefix_dir = plan.stage_dir(prefix.pop())
    assert saved_round(prefix_dir) == 4  # the prefix is left where it stopped
    for cell in plan.cells:
        fork_dir = plan.stage_dir(cell.stages[-1])
        assert saved_round(fork_dir) == 6
        config = (fork_dir / "config.yaml").read_text()
        assert ("mode: sr" in config) == (cell.cell == "sr/fork")
        record = json.loads((tmp_path / "results" / "forks" / "cpu" / cell.cell / "s0.json").read_text())
        assert [s["name"] for s in record["stages"]] == ["teacher", "prefix", "fork"]
    assert result is not None


def test_a_stopped_prefix_is_not_the_finished_run(tmp_path):
    # a run directory ignores stop_after (it resumes from there); a stage must not: a finished
    # run found under the prefix's key would leave every fork with no round of its own
    stopped = FORKS
    finished = FORKS.replace("rounds: 6, stop_after: 4,", "rounds: 6,")
    keys = []
    for n, text in enumerate((stopped, finished)):
        path = tmp_path / f"s{n}.yaml"
        path.write_text(text)
        plan = plan_suite(load_suite(str(path)), out=tmp_path / "runs")
        keys.append(plan.cells[0].stages[1])
    assert keys[0] != keys[1]


def test_datafree_fork_setting_is_checked_before_anything_runs(tmp_path, capsys):
    path = tmp_path / "forks.yaml"
    path.write_text(FORKS.replace("mode: sr, sr:", "mode: sr, sr_typo:"))
    err = cli_error(["suite", "run", str(path), "--dry-run", "--out", str(tmp_path / "runs")], capsys)
    assert "sr_typo" in err, err
