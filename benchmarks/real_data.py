"""Foundation benchmark on real data: a BadNets-poisoned teacher, then logit KD on clean data.

Reproduces the numbers of docs/results.md (the foundation tables): for each dataset, a teacher is
trained with the BadNets 3×3 grid trigger at 10 % dirty-label poisoning (target 0), then a
student is distilled with Hinton KD on 20 % of the training split (clean), and CA/ASR of both
are written to ``<out>/<dataset>/summary.json`` and printed as a Markdown table.

Runs are resumable: each stage's run directory keeps ``train_state.pt`` and a finished stage
(``metrics.json`` present) is skipped, so the table can be built in parts.

    python benchmarks/real_data.py --data-root ../shared/data --datasets cifar10 mnist gtsrb
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from kdguard.config import (AttackConfig, DataConfig, DistillJob, KDConfig, OptimConfig, TeacherJob,
                            TrainConfig)
from kdguard.jobs import distill, train_teacher
from kdguard.report import metrics_table
from kdguard.runtime import machine_label

# (teacher arch, teacher epochs, teacher weight decay, student arch, student epochs, batch size,
# student lr).
# CIFAR-10: 30 and 45 teacher epochs at weight decay 5e-4 gave CA 86.30 % and 86.87 %; 60
# epochs at He et al.'s 1e-4 fitted the training set better (92.9 % vs 91.0 %) but generalised
# worse (85.67 %), hence 60 epochs at 5e-4 (docs/results.md). MNIST: a LeNet-5 student (no
# BatchNorm) collapsed at lr 0.1, hence 0.05.
RECIPES = {
    "cifar10": ("resnet20", 60, 5e-4, "resnet8", 80, 128, 0.1),
    "gtsrb": ("resnet20", 12, 5e-4, "resnet8", 40, 128, 0.1),
    "mnist": ("lenet5", 6, 5e-4, "lenet5", 20, 128, 0.05),
}


def jobs(name: str, root: str, out: Path, scale: float) -> tuple[TeacherJob, DistillJob]:
    t_arch, t_ep, t_wd, s_arch, s_ep, bs, s_lr = RECIPES[name]
    teacher_epochs, student_epochs = max(1, round(t_ep * scale)), max(1, round(s_ep * scale))
    data = DataConfig(name=name, root=root, val_fraction=0.05, augment=True)
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    wd_tag = "" if t_wd == sgd.weight_decay else f"_wd{t_wd:g}"
    teacher = TeacherJob(data=data, attack=AttackConfig(name="badnets", target=0, poison_rate=0.1),
                         model=t_arch, out=str(out / name / f"teacher_{t_arch}_e{teacher_epochs}{wd_tag}"),
                         train=TrainConfig(epochs=teacher_epochs, batch_size=bs, progress=False,
                                           optim=replace(sgd, weight_decay=t_wd)))
    student = DistillJob(teacher=teacher.out, data=data, student=s_arch, clean_fraction=0.2,
                         kd=KDConfig(method="kd", temperature=4.0, alpha=0.9),
                         out=str(Path(teacher.out) / f"student_{s_arch}_kd_e{student_epochs}_lr{s_lr}"),
                         train=TrainConfig(epochs=student_epochs, batch_size=bs, progress=False,
                                           optim=replace(sgd, lr=s_lr)))
    return teacher, student


def run_stage(fn, job) -> dict:
    done = Path(job.out) / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    return fn(job).metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--datasets", nargs="+", default=["cifar10", "mnist", "gtsrb"], choices=sorted(RECIPES))
    ap.add_argument("--out", default="runs/bench_real")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every epoch count (smoke runs)")
    args = ap.parse_args()
    out = Path(args.out)
    for name in args.datasets:
        t0 = time.perf_counter()
        t_job, s_job = jobs(name, args.data_root, out, args.scale)
        t_metrics = run_stage(train_teacher, t_job)
        s_metrics = run_stage(distill, s_job)
        summary = {"dataset": name, "machine": machine_label(),
                   "teacher": {"arch": t_job.model, "epochs": t_job.train.epochs, **t_metrics},
                   "student_kd": {"arch": s_job.student, "epochs": s_job.train.epochs, **s_metrics},
                   "wall_s_this_invocation": time.perf_counter() - t0}
        (out / name / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\n## {name}\n")
        print(metrics_table([("teacher (BadNets grid 10 %)", t_job.model, t_metrics),
                             ("student, logit KD on 20 % clean", s_job.student, s_metrics)]))
        print(f"teacher {t_metrics.get('seconds', 0):.0f} s, student {s_metrics.get('seconds', 0):.0f} s")


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
