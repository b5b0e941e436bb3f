"""``kdguard distill-datafree``: a short run per method on a tiny image-folder data set."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import cli_error
from PIL import Image

from kdguard.checkpoint import model_spec, save_model
from kdguard.cli import main
from kdguard.datafree import METHOD_NAMES
from kdguard.models import build_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-class RGB image folder (train/test) and an (untrained) ResNet-8 teacher checkpoint."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 3)):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")
    torch.manual_seed(0)
    teacher = build_model("resnet8", num_classes=4, in_channels=3)
    manifest = {
        "model": model_spec(teacher, num_classes=4, in_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3),
        "dataset": {"name": "imagefolder"},
        "attack": {"config": {"name": "badnets", "target": 0, "poison_rate": None,
                              "label_mode": "all_to_one", "poisoning": None, "seed": 0, "params": {}}},
        "metrics": {"ca": 0.25, "asr": 1.0},
    }
    teacher_dir = tmp_path_factory.mktemp("teacher")
    save_model(teacher_dir, teacher, manifest)
    return root, teacher_dir


def _args(method, root, teacher, out):
    args = ["distill-datafree", f"teacher={teacher}", f"method={method}", "preset=cpu",
            f"data.root={root}", "schedule.rounds=2", "schedule.generator_steps=1",
            "schedule.student_steps=1", "schedule.batch_size=4", "generator.width=4",
            "ood.patches=8", "cmi.bank_size=8", "cmi.negatives=4", "cmi.head_dim=4",
            "monitor.every=1", "monitor.grid_every=1", "monitor.grid_size=4", "device=cpu",
            "progress=false", f"out={out}"]
    if method != "zskt":
        args.append("schedule.synthesis_batch_size=4")
    return args


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_short_cli_run_per_method(setup, tmp_path, method, capsys):
    root, teacher = setup
    out = tmp_path / method
    assert main(_args(method, root, teacher, out)) == 0
    printed = capsys.readouterr().out
    assert "CA=" in printed and "ASR=" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ca", "asr", "asr_all", "ra", "n_clean", "n_backdoor"} <= set(metrics)
    assert metrics["method"] == method and metrics["rounds"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2] and "ca" in lines[-1]["eval"]
    assert lines[-1]["eval"]["ca"] == metrics["ca"]  # the last round is what is reported
    assert lines[-1]["synthesis"]["images"] > 0
    assert metrics["synthesis"]["intervals"] == 2 and 0 < metrics["synthesis"]["top_share"] <= 1
    assert "Teacher's answers on the last interval's synthetic images" in (out / "report.md").read_text()
    assert (out / "synthetic_r000002.png").exists() and (out / "model.safetensors").exists()
    assert (out / "datafree_state.pt").exists() and "datafree" in (out / "report.md").read_text().lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == f"datafree/{method}" and manifest["attack"]["target"] == 0


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    _, teacher = setup
    assert main(["distill-datafree", f"teacher={teacher}", "method=gan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "method" in err and len(err.strip().splitlines()) == 1
    assert main(["distill-datafree", "--method", "zskt", f"out={tmp_path}"]) == 2
    assert "teacher" in capsys.readouterr().err


def test_distill_method_option_routes_to_the_data_free_engine(setup, tmp_path, capsys):
    root, teacher = setup
    args = _args("zskt", root, teacher, tmp_path / "routed")[1:]
    args = [a for a in args if not a.startswith(("method=", "teacher="))]
    assert main(["distill", "--teacher", str(teacher), "--method", "zskt", *args]) == 0
    manifest = json.loads((tmp_path / "routed" / "manifest.json").read_text())
    assert manifest["method"] == "datafree/zskt"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_short_cli_run_per_method_with_abd(setup, tmp_path, method, capsys):
    """One option (abd.mode=full) adds both ABD parts to every method; both show in the logs."""
    root, teacher = setup
    out = tmp_path / f"{method}_abd"
    args = _args(method, root, teacher, out) + ["abd.mode=full", "abd.sr.phase=0.5", "abd.sr.min_count=2"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["abd"]["mode"] == "full" and metrics["abd"]["sv"]["status"] == "active"
    assert metrics["abd"]["sr"]["sr_steps"] >= 1
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "sr_unlearn" in last["student_losses"]
    vaccine_term = "sv_push_away" if method == "ood" else "reg/sv_maximize_divergence"
    logged = last["student_losses"] if method == "ood" else last["generator_losses"]
    assert vaccine_term in logged
    assert all(math.isfinite(v) for v in {**last["student_losses"], **last["generator_losses"]}.values())


def test_bad_abd_settings_are_one_line_errors(setup, tmp_path, capsys):
    root, teacher = setup
    for bad, word in (("abd.mode=vaccine", "abd.mode"), ("abd.sr.phase=0", "abd.sr.phase"),
                      ("abd.sv.verify_batches=5", "verify_batches")):
        assert main(_args("zskt", root, teacher, tmp_path / "bad") + [bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and word in err and len(err.strip().splitlines()) == 1


def test_vaccine_generator_form_is_refused_for_ood(setup, tmp_path, capsys):
    root, teacher = setup
    err = cli_error(_args("ood", root, teacher, tmp_path / "x") + ["abd.mode=sv", "abd.sv.form=generator"],
                    capsys)
    assert "abd.sv.form" in err


def test_resume_with_a_longer_budget_stretches_the_schedule(setup, tmp_path):
    root, teacher = setup
    out = tmp_path / "zskt"
    assert main(_args("zskt", root, teacher, out)) == 0
    longer = [a if a != "schedule.rounds=2" else "schedule.rounds=4" for a in _args("zskt", root, teacher, out)]
    assert main([*longer, "--resume"]) == 0
    state = torch.load(out / "datafree_state.pt", weights_only=False)
    assert state["round"] == 4 and state["schedule"] == [{"round": 2, "progress": [1, 1]}]


def test_fork_continues_a_copy_of_a_stopped_run(setup, tmp_path, capsys):
    from kdguard.datafree.loop import saved_round

    root, teacher = setup
    prefix = tmp_path / "prefix"
    args = [a if a != "schedule.rounds=2" else "schedule.rounds=4" for a in _args("zskt", root, teacher, prefix)]
    assert main([*args, "schedule.stop_after=2"]) == 0 and saved_round(prefix) == 2
    before = (prefix / "datafree_state.pt").read_bytes()
    fork = tmp_path / "fork"
    assert main(["distill-datafree", "--fork", str(prefix), "abd.mode=sr", "abd.sr.phase=0.5",
                 "schedule.stop_after=null", f"out={fork}"]) == 0
    assert saved_round(fork) == 4 and "mode: sr" in (fork / "config.yaml").read_text()
    assert (prefix / "datafree_state.pt").read_bytes() == before  # the forked run is left as it was
    assert json.loads((fork / "run.json").read_text())  # the copy is a run of its own
    # one line each: no out=, out= is the run, out= not empty, teacher flags, a run without checkpoint
    for extra, needle in ((["abd.mode=sr"], "needs out="), ([f"out={prefix}"], "is the run being forked"),
                          ([f"out={fork}"], "not empty"), (["--teacher", str(teacher), f"out={tmp_path / 'f2'}"],
                                                            "do not apply")):
        assert needle in cli_error(["distill-datafree", "--fork", str(prefix), *extra], capsys)
    assert "no datafree_state.pt" in cli_error(["distill-datafree", "--fork", str(teacher), f"out={tmp_path / 'f3'}"],
                                               capsys)
    # the fork has run all its rounds: forking it again would run none
    assert "finished all 4" in cli_error(["distill-datafree", "--fork", str(fork), f"out={tmp_path / 'f4'}"], capsys)
    assert not (tmp_path / "f4").exists()
    # a fork that fails before its first round (no data there) leaves no copy behind
    assert "is not a folder" in cli_error(["distill-datafree", "--fork", str(prefix), "--data-root",
                                           str(tmp_path / "nowhere"), "schedule.stop_after=null",
                                           f"out={tmp_path / 'f5'}"], capsys)
    assert not (tmp_path / "f5").exists()
