"""A table of bad inputs to every command: each exits with code 2 and one line ``error: …``.

Every case runs ``kdguard.cli.main`` in-process and must be rejected before any training starts:
exit code 2, stderr exactly one line starting ``error: ``, no traceback, and the line holding the
expected fragment (the offending value or the setting to change). Paths in the arguments are
``{out}`` (a fresh run directory), ``{teacher}`` (the pytest session's 1-epoch BadNets LeNet-5,
conftest.py), ``{encoder}`` (a 1-epoch SimCLR LeNet-5 encoder) and ``{bad}`` (the broken files of
:func:`bad`).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import CLI_FAST

from kdguard.cli import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")


@pytest.fixture(scope="session")
def encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl_encoder")
    rc = main(["ssl-pretrain", "data.name=mnist_embedded", "data.limit=128", "encoder.arch=lenet5",
               "encoder.proj_hidden=16", "encoder.proj_dim=8", "train.epochs=1", "train.batch_size=64",
               "train.progress=false", "knn_k=0", f"out={out}"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def bad(tmp_path_factory, teacher_dir):
    """Broken inputs: config files, run directories with damaged weights or manifests, a file."""
    d = tmp_path_factory.mktemp("bad")
    (d / "malformed.yaml").write_text("{a: [1,\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "scalar.yaml").write_text("42\n")
    (d / "unknown_key.yaml").write_text("trian:\n  epochs: 1\n")
    (d / "config_dir").mkdir()
    (d / "empty_dir").mkdir()
    (d / "file").write_text("not a directory")
    weights = (teacher_dir / "model.safetensors").read_bytes()
    manifest = json.loads((teacher_dir / "manifest.json").read_text())

    def run(name: str, manifest_text: str, weights_bytes: bytes = weights) -> None:
        (d / name).mkdir()
        (d / name / "manifest.json").write_text(manifest_text)
        (d / name / "model.safetensors").write_bytes(weights_bytes)

    run("corrupt_weights", json.dumps(manifest), b"not safetensors at all")
    run("empty_weights", json.dumps(manifest), b"")
    run("manifest_not_json", "{not json")
    run("manifest_list", "[1, 2]")
    run("manifest_no_model", json.dumps({k: v for k, v in manifest.items() if k != "model"}))
    run("manifest_classes_abc", json.dumps({**manifest, "model": {**manifest["model"], "num_classes": "abc"}}))
    run("other_arch", json.dumps({**manifest, "model": {**manifest["model"], "arch": "resnet8"}}))
    (d / "bare.safetensors").write_bytes(weights)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cases(prefix: list[str], rows: list) -> list:
    out = []
    for row in rows:
        case_id, args, fragment, *marks = row
        out.append(pytest.param([*prefix, *args], fragment, id=f"{prefix[0]}-{case_id}", marks=marks))
    return out


TEACHER = ["train-teacher", *CLI_FAST, "out={out}"]
DISTILL = ["distill", *CLI_FAST, "out={out}", "--teacher", "{teacher}"]
DATAFREE = ["distill-datafree", "out={out}", "--teacher", "{teacher}"]
DEFEND = ["defend", *CLI_FAST, "out={out}", "--model", "{teacher}"]
ROBUSTKD = ["robustkd", *CLI_FAST, "detox.epochs=1", "out={out}", "--teacher", "{teacher}"]
TRIGGER = ["robustkd-trigger", "out={out}", "--teacher", "{teacher}"]
PRETRAIN = ["ssl-pretrain", "out={out}", "train.epochs=1", "data.name=mnist_embedded", "data.limit=64",
            "encoder.arch=lenet5"]
BADENCODER = ["badencoder", "out={out}", "train.epochs=1", "shadow.name=mnist_embedded", "shadow.limit=64"]
PROBE = ["ssl-probe", "out={out}", "--encoder", "{encoder}", "datasets=[mnist_embedded]"]
SSL_DEFEND = ["ssl-defend", "out={out}", "--encoder", "{encoder}", "data.name=mnist_embedded",
              "datasets=[mnist_embedded]"]
IMPORT = ["import-teacher", "out={out}", "--teacher"]
BARE_LENET = ["--teacher", "{bad}/bare.safetensors", "--teacher-arch", "lenet5", "--num-classes", "10",
              "--in-channels", "1"]
GRID = ["ssl-grid", "out={out}", "--encoder", "{encoder}", "data.name=mnist_embedded", "datasets=[mnist_embedded]"]

CASES = [
    *_cases(TEACHER, [
        ("unknown-key", ["trian.epochs=1"], "Key 'trian' not in"),
        ("epochs-text", ["train.epochs=abc"], "could not be converted to Integer"),
        ("epochs-negative", ["train.epochs=-1"], "train.epochs=-1 must be an integer >= 1"),
        ("epochs-zero", ["train.epochs=0"], "train.epochs=0"),
        ("batch-zero", ["train.batch_size=0"], "train.batch_size=0"),
        ("eval-batch-zero", ["train.eval_batch_size=0"], "train.eval_batch_size=0"),
        ("lr-zero", ["train.optim.lr=0"], "train.optim.lr=0.0 is outside (0, 10]"),
        ("lr-negative", ["train.optim.lr=-0.1"], "train.optim.lr=-0.1"),
        ("optimizer", ["train.optim.name=adamw"], "train.optim.name='adamw'"),
        ("schedule", ["train.optim.schedule=linear"], "train.optim.schedule='linear'"),
        ("momentum", ["train.optim.momentum=2"], "train.optim.momentum=2.0"),
        ("weight-decay", ["train.optim.weight_decay=-1"], "train.optim.weight_decay=-1.0"),
        ("milestones", ["train.optim.milestones=[2]"], "train.optim.milestones"),
        ("gamma", ["train.optim.gamma=0"], "train.optim.gamma=0.0"),
        ("warmup", ["train.optim.warmup_epochs=-1"], "train.optim.warmup_epochs=-1.0"),
        ("nesterov", ["train.optim.nesterov=true", "train.optim.momentum=0"], "needs momentum"),
        ("grad-clip", ["train.grad_clip=-1"], "train.grad_clip=-1.0"),
        ("amp", ["train.amp=maybe"], "train.amp='maybe'"),
        ("channels-last", ["train.channels_last=sometimes"], "train.channels_last='sometimes'"),
        ("device-unknown", ["train.device=gpu"], "set train.device=auto"),
        ("device-cuda", ["train.device=cuda"], "set train.device=cpu", NO_CUDA),
        ("val-fraction-high", ["data.val_fraction=1.5"], "validation fraction 1.5"),
        ("val-fraction-zero", ["data.val_fraction=0"], "validation fraction 0.0"),
        ("bool-text", ["data.augment=maybe"], "not a valid bool"),
        ("dataset", ["data.name=imagenet"], "unknown dataset 'imagenet'"),
        ("model", ["model=resnet21"], "unknown model 'resnet21'"),
        ("model-import", ["model=nonexistent_pkg.models:factory"], "nonexistent_pkg"),
        ("attack", ["attack.name=badnetz"], "unknown attack 'badnetz'"),
        ("poison-rate-zero", ["attack.poison_rate=0"], "poison rate 0.0"),
        ("poison-rate-high", ["attack.poison_rate=1.5"], "poison rate 1.5"),
        ("target-K", ["attack.target=10"], "target class 10"),
        ("target-negative", ["attack.target=-1"], "target class -1"),
        ("label-mode", ["attack.label_mode=some_to_one"], "label_mode 'some_to_one'"),
        ("poisoning", ["attack.poisoning=dirty"], "poisoning 'dirty'"),
        ("trigger-too-large", ["attack.params.size=40"], "larger than the 28×28 image"),
        ("trigger-param", ["attack.params.nope=1"], "unknown parameter(s) 'nope'"),
        ("blend-alpha", ["attack.name=blend", "attack.params.alpha=2"], "blend alpha 2.0"),
        ("wanet-k", ["attack.name=wanet", "attack.params.k=100"], "wanet k 100"),
        ("seed-text", ["seed=abc"], "could not be converted to Integer"),
        ("data-root-missing", ["data.name=cifar10", "data.root={bad}/nonexistent"], "is not a folder"),
        ("data-root-option", ["--data-root", "{bad}/nonexistent", "data.name=gtsrb"], "is not a folder"),
        ("config-missing", ["-c", "{bad}/missing.yaml"], "does not exist"),
        ("config-malformed", ["-c", "{bad}/malformed.yaml"], "malformed.yaml"),
        ("config-list", ["-c", "{bad}/list.yaml"], "list.yaml"),
        ("config-scalar", ["-c", "{bad}/scalar.yaml"], "scalar.yaml"),
        ("config-directory", ["-c", "{bad}/config_dir"], "config_dir"),
        ("config-unknown-key", ["-c", "{bad}/unknown_key.yaml"], "Key 'trian' not in"),
        ("override-without-equals", ["train.epochs"], "not of the form key=value"),
        ("override-empty-key", ["=1"], "TeacherJob"),
        ("interpolation", ["train.epochs=${oc.env:HOME}"], "interpolation"),
        ("out-under-file", ["out={bad}/file/run"], "which is a file"),
        ("out-is-file", ["out={bad}/file"], "is a file, not a directory"),
        ("out-proc", ["out=/proc/kdguard-x"], "/proc"),
    ]),
    *_cases(DISTILL[:-2], [("no-teacher", [], "required setting 'teacher'")]),
    *_cases(DISTILL[:-1], [
        ("teacher-missing", ["{bad}/nonexistent"], "does not exist"),
        ("corrupt-weights", ["{bad}/corrupt_weights"], "as safetensors"),
        ("empty-weights", ["{bad}/empty_weights"], "as safetensors"),
        ("manifest-not-json", ["{bad}/manifest_not_json"], "not readable JSON"),
        ("manifest-list", ["{bad}/manifest_list"], "holds a list"),
        ("manifest-no-model", ["{bad}/manifest_no_model"], "--teacher-arch"),
        ("manifest-classes-abc", ["{bad}/manifest_classes_abc"], "num_classes 'abc'"),
        ("other-architecture", ["{bad}/other_arch"], "does not match architecture 'resnet8'"),
        ("no-weights-in-dir", ["{bad}/empty_dir"], "no model.safetensors"),
        ("teacher-plain-file", ["{bad}/file"], "--teacher-arch"),
    ]),
    *_cases(DISTILL, [
        ("clean-fraction-zero", ["clean_fraction=0"], "clean fraction 0.0"),
        ("clean-fraction-two", ["clean_fraction=2"], "clean fraction 2.0"),
        ("kd-method", ["kd.method=kdd"], "unknown KD method 'kdd'"),
        ("method-option", ["--method", "nope"], "unknown KD method 'nope'"),
        ("kd-combination", ["kd.method=at+nope"], "unknown KD method 'nope'"),
        ("student", ["student=resnet21"], "unknown model 'resnet21'"),
        ("temperature", ["kd.temperature=0"], "temperature 0.0"),
        ("alpha", ["kd.alpha=1.5"], "KD alpha 1.5"),
        ("at-p", ["kd.method=at", "kd.options.p=0"], "kd.options.p=2"),
        ("kd-option-unknown", ["kd.method=at", "kd.options.nope=1"], "option 'nope' is not accepted"),
        ("nst-degree", ["kd.method=nst", "kd.options.degree=0"], "kd.options.degree=2"),
        ("cc-gamma", ["kd.method=cc", "kd.options.gamma=0"], "kd.options.gamma=0.4"),
        ("paths-string", ["kd.method=at", "kd.options.student_paths=layer1"], "kd.options.student_paths=["),
        ("weight-negative", ["kd.method=at", "kd.weights.at=-1"], "weight -1.0"),
        ("weight-unknown-method", ["kd.method=at", "kd.weights.nope=1"], "unknown KD method 'nope'"),
        ("weights-with-plain-kd", ["kd.weights.at=1000"], "kd.weights is set"),
        ("kd-unknown-key", ["kd.nope=1"], "Key 'nope' not in 'KDConfig'"),
        ("target-K", ["attack.target=10"], "target class 10"),
        ("data-root-missing", ["data.name=gtsrb", "data.root={bad}/nonexistent"], "is not a folder"),
        ("config-list", ["-c", "{bad}/list.yaml"], "list.yaml"),
        ("lr-zero", ["train.optim.lr=0"], "train.optim.lr=0.0"),
    ]),
    *_cases(["distill", "out={out}", "--teacher", "{teacher}"], [
        ("routed-to-datafree", ["kd.method=zskt", "schedule.rounds=0"], "schedule.rounds 0"),
    ]),
    *_cases(DATAFREE[:-2], [("no-teacher", [], "required setting 'teacher'")]),
    *_cases(DATAFREE, [
        ("method", ["method=zsk"], "data-free method 'zsk'"),
        ("method-option", ["--method", "nope"], "data-free method 'nope'"),
        ("preset", ["preset=gpu"], "preset 'gpu'"),
        ("rounds-zero", ["schedule.rounds=0"], "schedule.rounds 0"),
        ("rounds-text", ["schedule.rounds=abc"], "could not be converted to Integer"),
        ("lr-zero", ["student_optim.lr=0"], "student_optim.lr 0.0"),
        ("betas", ["generator_optim.betas=[0.9]"], "generator_optim.betas"),
        ("generator", ["generator.kind=gan"], "generator.kind 'gan'"),
        ("abd-mode", ["abd.mode=maybe"], "abd.mode 'maybe'"),
        ("abd-sr-phase", ["abd.sr.phase=2"], "abd.sr.phase 2.0"),
        ("abd-verify", ["abd.sv.verify_batches=5", "abd.sv.verify_skip=10"], "abd.sv.verify_batches=50"),
        ("collapse-share", ["monitor.collapse_share=0"], "monitor.collapse_share=0.0"),
        ("unknown-key", ["zskt.nope=1"], "Key 'nope' not in 'ZSKTOptions'"),
        ("ood-source", ["method=ood", "ood.source=web"], "ood.source 'web'"),
        ("device", ["device=gpu"], "set device=auto"),
        ("target-K", ["attack.target=10"], "target class 10"),
        ("dataset", ["data.name=imagenet"], "unknown dataset 'imagenet'"),
        ("student", ["student=resnet21"], "unknown model 'resnet21'"),
        ("override-without-equals", ["schedule"], "schedule.rounds=500"),
        ("config-scalar", ["-c", "{bad}/scalar.yaml"], "scalar.yaml"),
    ]),
    *_cases(DATAFREE[:-1], [("manifest-not-json", ["{bad}/manifest_not_json"], "not readable JSON")]),
    *_cases(["evaluate"], [
        ("missing", ["{bad}/nonexistent"], "does not exist"),
        ("corrupt-weights", ["{bad}/corrupt_weights"], "as safetensors"),
        ("manifest-not-json", ["{bad}/manifest_not_json"], "not readable JSON"),
        ("manifest-no-model", ["{bad}/manifest_no_model"], "--teacher-arch"),
        ("other-architecture", ["{bad}/other_arch"], "does not match architecture 'resnet8'"),
        ("attack", ["{teacher}", "--attack", "badnetz"], "unknown attack 'badnetz'"),
        ("target-K", ["{teacher}", "--attack", "blend", "--target", "10"], "target class 10"),
        ("dataset", ["{teacher}", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        ("data-root", ["{teacher}", "--dataset", "cifar10", "--data-root", "{bad}/nonexistent"], "is not a folder"),
        ("two-attacks", ["{teacher}", "--attack", "blend", "--attack-from", "{teacher}"], "only one of them"),
        ("attack-from-missing", ["{teacher}", "--attack-from", "{bad}/nonexistent"], "does not exist"),
        ("device", ["{teacher}", "--device", "gpu"], "set --device auto"),
        ("device-cuda", ["{teacher}", "--device", "cuda"], "set --device cpu", NO_CUDA),
        ("arch", ["{teacher}", "--teacher-arch", "resnet21"], "unknown model 'resnet21'"),
        ("in-channels", ["{teacher}", "--in-channels", "2"], "in_channels 2"),
        ("input-norm", ["{teacher}", "--teacher-input-norm", "abc"], "MEAN/STD"),
        ("target-text", ["{teacher}", "--target", "abc"], "--target"),
        ("unknown-option", ["{teacher}", "--nope"], "--nope"),
        ("no-checkpoint", [], "checkpoint"),
    ]),
    *_cases(DEFEND[:-2], [("no-model", [], "required setting 'model'")]),
    *_cases(DEFEND[:-1], [
        ("model-missing", ["{bad}/nonexistent"], "does not exist"),
        ("corrupt-weights", ["{bad}/corrupt_weights"], "as safetensors"),
    ]),
    *_cases(DEFEND, [
        ("method", ["method=nope"], "unknown defense 'nope'"),
        ("clean-fraction-zero", ["clean_fraction=0"], "clean fraction 0.0"),
        ("clean-fraction-two", ["clean_fraction=2"], "clean fraction 2.0"),
        ("nad-p", ["method=nad", "nad.p=0"], "nad.p=2"),
        ("nad-teacher-epochs", ["method=nad", "nad.teacher_epochs=0"], "nad.teacher_epochs=0"),
        ("nad-variant", ["method=nad", "nad.variant=nope"], "attention-transfer variant 'nope'"),
        ("nad-betas", ["method=nad", "nad.betas=[1,2,3,4,5,6,7]"], "7 betas"),
        ("nad-student", ["method=nad", "nad.student=resnet21"], "unknown model 'resnet21'"),
        ("fp-layer", ["method=fp", "fineprune.layer=nope"], "valid paths: "),
        ("fp-tolerance", ["method=fp", "fineprune.ca_tolerance=2"], "fineprune.ca_tolerance 2.0"),
        ("fp-select", ["method=fp", "fineprune.select_on=test"], "fineprune.select_on 'test'"),
        ("fp-step", ["method=fp", "fineprune.step_ratio=0"], "fineprune.step_ratio 0.0"),
        ("batch-zero", ["train.batch_size=0"], "train.batch_size=0"),
        ("unknown-key", ["fineprune.nope=1"], "Key 'nope' not in 'FinePruneConfig'"),
    ]),
    *_cases(ROBUSTKD, [
        ("pair", ["pair=nope"], "unknown RobustKD pair 'nope'"),
        ("clean-fraction-zero", ["clean_fraction=0"], "clean fraction 0.0"),
        ("epsilon", ["detox.epsilon=2"], "detox.epsilon=0.2"),
        ("form", ["detox.form=nope"], "detox objective form 'nope'"),
        ("granularity", ["detox.granularity=pixel"], "granularity 'pixel'"),
        ("detox-epochs", ["detox.epochs=0"], "detox epochs 0"),
        ("detox-lr", ["detox.lr=0"], "detox learning rate 0.0"),
        ("fidelity-weights", ["detox.ce_weight=0", "detox.kd_weight=0"], "both detox fidelity weights"),
        ("detox-load", ["detox.load={bad}/nonexistent"], "does not exist"),
        ("detox-paths", ["detox.paths=[nope]"], "valid paths: "),
        ("unknown-key", ["detox.nope=1"], "Key 'nope' not in 'DetoxConfig'"),
        ("lr-negative", ["train.optim.lr=-1"], "train.optim.lr=-1.0"),
    ]),
    *_cases(ROBUSTKD[:-1], [("other-architecture", ["{bad}/other_arch"], "does not match architecture")]),
    *_cases(TRIGGER[:-2], [("no-teacher", [], "required setting 'teacher'")]),
    *_cases(TRIGGER, [
        ("epochs", ["epochs=0"], "epochs 0"),
        ("unknown-key", ["target=10"], "Key 'target' not in 'TriggerJob'"),
        ("max-mask", ["max_mask=2"], "max_mask 2.0"),
        ("lr", ["lr=0"], "trigger learning rate 0.0"),
        ("device", ["device=gpu"], "set device=auto"),
    ]),
    *_cases(TRIGGER[:-1], [("manifest-not-json", ["{bad}/manifest_not_json"], "not readable JSON")]),
    *_cases(PRETRAIN, [
        ("dataset", ["data.name=imagenet"], "unknown dataset 'imagenet'"),
        ("data-root", ["data.name=cifar10", "data.root={bad}/nonexistent"], "is not a folder"),
        ("arch", ["encoder.arch=resnet21"], "unknown model 'resnet21'"),
        ("temperature", ["temperature=0"], "temperature=0.0 must be > 0"),
        ("limit", ["data.limit=0"], "subset size 0"),
        ("crop-scale", ["augment.crop_scale=[2,1]"], "augment.crop_scale"),
        ("jitter-p", ["augment.jitter_p=2"], "augment.jitter_p=2.0"),
        ("hue", ["augment.hue=2"], "augment.hue=2.0"),
        ("knn-k", ["knn_k=-1"], "knn_k=-1"),
        ("proj-dim", ["encoder.proj_dim=0"], "projection head"),
        ("arch-option", ["encoder.options.nope=1"], "option(s) 'nope'"),
        ("batch-one", ["train.batch_size=1"], "batch_size >= 2"),
        ("unknown-key", ["nope=1"], "Key 'nope' not in 'PretrainJob'"),
    ]),
    *_cases(BADENCODER, [
        ("no-encoder", [], "required setting 'encoder'"),
        ("encoder-missing", ["--encoder", "{bad}/nonexistent"], "is not a directory"),
        ("encoder-is-classifier", ["--encoder", "{teacher}"], "not an SSL encoder checkpoint"),
        ("encoder-manifest-not-json", ["--encoder", "{bad}/manifest_not_json"], "not readable JSON"),
        ("no-targets", ["--encoder", "{encoder}", "targets=[]"], "at least one target"),
        ("trigger-outside-image", ["--encoder", "{encoder}"], "outside the 28×28 image"),
        ("shadow-dataset", ["--encoder", "{encoder}", "shadow.name=imagenet"], "unknown dataset 'imagenet'"),
        ("list-index-override", ["--encoder", "{encoder}", "targets.0.target=10"], "targets"),
    ]),
    *_cases(PROBE[:2], [("no-encoder", [], "required setting 'encoder'")]),
    *_cases(PROBE[:3], [("encoder-is-classifier", ["{teacher}"], "not an SSL encoder checkpoint")]),
    *_cases(PROBE, [
        ("dataset", ["datasets=[imagenet]"], "unknown dataset 'imagenet'"),
        ("no-dataset", ["datasets=[]"], "no downstream dataset"),
        ("data-root", ["datasets=[cifar10]", "root={bad}/nonexistent"], "is not a folder"),
        ("head", ["probe.head=nope"], "probe head 'nope'"),
        ("epochs", ["probe.epochs=0"], "probe epochs=0"),
        ("lr", ["probe.lr=0"], "lr=0.0"),
        ("dropout", ["probe.dropout=2"], "probe dropout 2.0"),
        ("hidden", ["probe.hidden=[0]"], "probe hidden sizes [0]"),
        ("train-limit", ["probe.train_limit=0"], "subset size 0"),
        ("device", ["probe.device=gpu"], "set probe.device=auto"),
    ]),
    *_cases(SSL_DEFEND, [
        ("teacher", ["teacher=nope"], "unknown teacher 'nope'"),
        ("student", ["student=nope"], "unknown student 'nope'"),
        ("loss", ["loss=nope"], "SSL distillation loss 'nope'"),
        ("clean-fraction", ["defense.clean_fraction=0"], "clean"),
        ("temperature", ["defense.temperature=0"], "defense.temperature=0.0"),
        ("stage-weights", ["defense.stage_weights=[-1]"], "defense.stage_weights"),
        ("loss-option", ["defense.loss_options.nope=1"], "'nope'"),
        ("prune-ratio", ["defense.prune_ratio=2"], "defense.prune_ratio=2.0"),
        ("augment", ["defense.augment.gray_p=-1"], "defense.augment.gray_p=-1.0"),
        ("warmup-lr", ["defense.warmup.optim.lr=0"], "defense.warmup.optim.lr=0.0"),
        ("finetune-device", ["defense.finetune.device=gpu"], "set defense.finetune.device=auto"),
    ]),
    *_cases(SSL_DEFEND[:3], [("encoder-missing", ["{bad}/nonexistent"], "is not a directory")]),
    *_cases(GRID, [
        ("cells", ["cells=nope"], "cell mode 'nope'"),
        ("loss", ["losses=[nope]"], "SSL distillation loss 'nope'"),
        ("teacher", ["teachers=[nope]"], "unknown teacher 'nope'"),
        ("no-student", ["students=[]"], "no student given"),
        ("asr-goal", ["asr_goal=2"], "asr_goal=2.0"),
        ("ca-cost-goal", ["ca_cost_goal=-1"], "ca_cost_goal=-1.0"),
        ("loss-option-other-loss", ["defense.loss_options.variant=nad"], "loss 'afd'"),
        ("loss-variant", ["losses=[at]", "defense.loss_options.variant=nope"], "at variant 'nope'"),
        ("clean-encoder-missing", ["clean_encoder={bad}/nonexistent"], "is not a directory"),
    ]),
    *_cases(IMPORT[:2], [("no-teacher", [], "required setting 'teacher'")]),
    *_cases(IMPORT, [
        ("teacher-missing", ["{bad}/nonexistent"], "does not exist"),
        ("no-architecture", ["{bad}/bare.safetensors"], "--teacher-arch"),
        ("other-architecture", ["{bad}/bare.safetensors", "--teacher-arch", "resnet8", "--num-classes", "10"],
         "does not match architecture 'resnet8'"),
        ("corrupt-weights", ["{bad}/corrupt_weights/model.safetensors", "--teacher-arch", "lenet5",
                             "--num-classes", "10"], "as safetensors"),
        ("dataset", [*BARE_LENET[1:], "data.name=imagenet"], "unknown dataset 'imagenet'"),
        ("classes-mismatch", ["{bad}/bare.safetensors", "--teacher-arch", "lenet5", "--num-classes", "7"],
         "does not match architecture"),
        ("device", [*BARE_LENET[1:], "device=gpu"], "set device=auto"),
        ("out-is-source", ["{teacher}", "out={teacher}"], "source directory"),
    ]),
    *_cases(["audit", "out={out}"], [
        ("no-teacher", [], "required setting 'teacher'"),
        ("teacher-missing", ["--teacher", "{bad}/nonexistent"], "does not exist"),
        ("bare-no-dataset", BARE_LENET, "names no dataset"),
        ("bare-no-architecture", ["--teacher", "{bad}/bare.safetensors"], "--teacher-arch"),
        ("no-clean-data", ["--teacher", "{teacher}", "clean_fraction=0"], "clean fraction"),
        ("votes", ["--teacher", "{teacher}", "audit.votes=0"], "votes"),
        ("epochs", ["--teacher", "{teacher}", "audit.epochs=0"], "epochs"),
        ("eps", ["--teacher", "{teacher}", "audit.eps_max=1.5"], "eps_max"),
        ("max-images", ["--teacher", "{teacher}", "audit.max_images=-1"], "max_images"),
        ("unknown-key", ["--teacher", "{teacher}", "audit.epoch=3"], "Key 'epoch' not in"),
        ("dataset", [*BARE_LENET, "data.name=imagenet"], "unknown dataset 'imagenet'"),
        ("out-is-teacher", ["--teacher", "{teacher}", "out={teacher}"], "teacher's own directory"),
    ]),
    *_cases(["audit-summary"], [
        ("no-audit", [], "Missing argument"),
        ("not-an-audit", ["{teacher}"], "cannot read the audit"),
    ]),
    *_cases(["evaluate", "{teacher}"], [
        ("from-audit-not-an-audit", ["--from-audit", "{teacher}"], "cannot read the audit"),
        ("audit-class-alone", ["--audit-class", "1"], "--from-audit"),
        ("from-audit-and-attack", ["--from-audit", "{teacher}", "--attack", "blend"], "only one of them"),
    ]),
    *_cases(["defend", "out={out}", "--model", "{teacher}"], [
        ("unlearn-without-trigger", ["method=unlearn"], "--from-audit"),
        ("from-audit-other-method", ["method=ft", "--from-audit", "{teacher}"], "method=unlearn"),
        ("unlearn-share", ["method=unlearn", "unlearn.share=0", "unlearn.trigger.name=blend"], "unlearn share"),
    ]),
    *_cases(["list"], [
        ("unknown-option", ["--nope"], "--nope"),
        ("extra-argument", ["extra"], "extra"),
    ]),
    *_cases(["suite"], [  # suite files themselves: tests/suites/test_suite_files.py
        ("unknown-subcommand", ["launch"], "launch"),
        ("unknown-suite", ["run", "no-such-suite", "--dry-run"], "unknown suite"),
        ("bad-seeds", ["run", "tiny", "--dry-run", "--seeds", "0,one"], "--seeds"),
        ("repeated-seed", ["run", "tiny", "--dry-run", "--seeds", "0,0"], "repeats"),
        ("unknown-scale", ["run", "tiny", "--dry-run", "--scale", "huge"], "no scale"),
        ("only-matches-nothing", ["run", "tiny", "--dry-run", "--only", "nothing/*"], "matches no cell"),
        ("unknown-engine", ["run", "tiny", "--only", "x*", "--engine", "spark"], "matches no cell"),
        ("zero-threads", ["run", "tiny", "--dry-run", "--threads", "0"], "--threads"),
        ("negative-gpus", ["run", "tiny", "--dry-run", "--gpus-per-stage", "-1"], "--gpus-per-stage"),
        ("report-missing-file", ["report", "missing.yaml"], "does not exist"),
        ("status-unknown-suite", ["status", "no-such-suite"], "unknown suite"),
        ("list-unknown-suite", ["list", "no-such-suite"], "unknown suite"),
    ]),
    *_cases(["probe"], [  # the diagnostics on real runs: tests/cli/test_probe.py
        ("sv-premise-missing-run", ["sv-premise", "/nonexistent/run"], "not a directory"),
        ("sv-premise-bad-layers", ["sv-premise", ".", "--layers", "a,b"], "--layers"),
        ("synthetic-zero-images", ["synthetic", ".", "--n", "0"], "--n"),
        ("sr-perturbation-zero-batches", ["sr-perturbation", ".", "--batches", "0"], "--batches"),
        ("target-share-zero-temperature", ["target-share", ".", "--temperature", "0"], "--temperature"),
    ]),
    *_cases(["no-such-command"], [("unknown-command", [], "no-such-command")]),
]


def test_the_table_covers_every_command():
    from kdguard import cli

    cli._load_command_modules()
    import typer

    commands = set(typer.main.get_command(cli.app).commands) - {"demo"}
    covered = {p.values[0][0] for p in CASES}
    assert commands <= covered, commands - covered
    assert len(CASES) >= 100


@pytest.mark.parametrize("argv, fragment", CASES)
def test_bad_input_is_one_line_with_exit_code_2(argv, fragment, request, tmp_path, capsys):
    paths = {"out": tmp_path / "run", "bad": None, "teacher": None, "encoder": None}
    text = " ".join(argv)
    for name in ("bad", "teacher", "encoder"):
        if "{" + name + "}" in text:
            paths[name] = request.getfixturevalue("teacher_dir" if name == "teacher" else name)
    args = [a.format(**paths) if "{" in a and "${" not in a else a for a in argv]
    capsys.readouterr()
    rc = main(args)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert fragment in err, err
