"""The poisoned-encoder track on real data (issue 5, paper 1: Han et al., arXiv 2403.03846).

Protocol (every stage is a resumable run directory under ``--out``; a finished stage is reused):

1. ``pretrain``   SimCLR encoder on CIFAR-10 (a seeded subset at CPU scale);
2. ``badencoder`` BadEncoder with one target per downstream task, each with its own trigger
   (10×10 white squares at different corners; CIFAR-10 → truck (9) with BadEncoder's patch at
   (21, 21), GTSRB → priority road (12) at (1, 1), MNIST → one (1) at (1, 21));
3. ``probes``     downstream CA / ASR / ASR-all of the clean and the poisoned encoder (both with the
   poisoned encoder's triggers, so the clean row is the trigger's chance level);
4. ``grid``       the defence study on 5 % of CIFAR-10's training split: by default paper 1's best
   components (fine-tuned teacher, warm-up student, AT) plus one alternative of each (poisoned
   teacher, random student, FitNet), varied one at a time (``--cells factorial`` for all
   combinations, ``--full`` for the whole 4 × 3 × 6 study).

Everything is printed as Markdown and written to ``<out>/summary.md`` and ``summary.json``.

    python benchmarks/ssl_track.py --data-root ../shared/data                 # CPU scale (hours)
    python benchmarks/ssl_track.py --data-root ../shared/data --scale paper  # ResNet-18, GPU
    python benchmarks/ssl_track.py --data-root ../shared/data --smoke        # minutes, checks wiring

CPU scale (ResNet-20, 64-d features) is sized for a 2-core machine: SimCLR 40 epochs on 15k
CIFAR-10 images, BadEncoder 40 epochs on a 10k shadow set, defence 100 epochs on 2,500 images;
see ``docs/ssl.md`` for the estimates. Paper scale uses the reference codes' settings (ResNet-18,
SimCLR 1000 epochs on all of CIFAR-10, BadEncoder 200 epochs, defence 500 epochs, probe 500 epochs).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from kdguard.config import OptimConfig, TrainConfig
from kdguard.ssl.config import (AugmentConfig, BadEncoderJob, DefenseConfig, EncoderConfig, GridJob, PretrainJob,
                                ProbeConfig, SSLDataConfig, TargetConfig, adam_schedule)
from kdguard.ssl.badencoder import targets_from_manifest
from kdguard.ssl.encoder import load_ssl_model
from kdguard.jobs import run_badencoder_job, run_grid, run_pretrain
from kdguard.ssl.downstream import load_downstream, probe_table
from kdguard.ssl.grid import cached_probe
from kdguard.runtime import machine_label

#: downstream dataset → (target class, trigger position) of its backdoor
TARGETS = {"cifar10": (9, [21, 21]), "gtsrb": (12, [1, 1]), "mnist": (1, [1, 21])}

SCALES = {
    # arch, pretrain (limit, epochs, batch), badencoder (shadow, epochs, lr), defence (epochs, finetune,
    # warmup), pool the clean 5 % is drawn from (None = all 50,000), probe (epochs, batch, lr,
    # train_limit, test_limit)
    "cpu": dict(arch="resnet20", pre=(15000, 40, 256), bad=(10000, 40, 0.05), defense=(100, 30, 100),
                pool=None, probe=(30, 256, 1e-3, None, None)),
    "paper": dict(arch="resnet18", pre=(None, 1000, 256), bad=(None, 200, 1e-3), defense=(500, 100, 100),
                  pool=None, probe=(500, 64, 1e-4, None, None)),
    "smoke": dict(arch="resnet8", pre=(512, 1, 128), bad=(512, 1, 0.05), defense=(1, 1, 1),
                  pool=2000, probe=(2, 256, 1e-3, 1000, 500)),
}


def sgd(epochs: int, batch: int, lr: float) -> TrainConfig:
    """BadEncoder's optimiser: SGD, momentum 0.9, weight decay 5e-4, constant rate."""
    return TrainConfig(epochs=epochs, batch_size=batch, progress=False,
                       optim=OptimConfig(name="sgd", lr=lr, momentum=0.9, weight_decay=5e-4, schedule="constant"))


def quiet(cfg: TrainConfig) -> TrainConfig:
    return replace(cfg, progress=False)


def jobs(args: argparse.Namespace) -> tuple[PretrainJob, BadEncoderJob, GridJob]:
    s = dict(SCALES[args.scale])
    if args.pretrain_epochs:
        s["pre"] = (s["pre"][0], args.pretrain_epochs, s["pre"][2])
    if args.badencoder_epochs or args.badencoder_lr:
        s["bad"] = (s["bad"][0], args.badencoder_epochs or s["bad"][1], args.badencoder_lr or s["bad"][2])
    if args.defense_epochs:
        s["defense"] = (args.defense_epochs, *s["defense"][1:])
    out, root = Path(args.out), args.data_root
    limit, pre_epochs, pre_batch = s["pre"]
    pretrain = PretrainJob(data=SSLDataConfig("cifar10", root, limit), encoder=EncoderConfig(arch=s["arch"]),
                           train=quiet(adam_schedule(pre_epochs, pre_batch)),
                           knn_k=200 if args.scale != "smoke" else 20,
                           seed=args.seed, out=str(out / "pretrain"))
    shadow, bad_epochs, bad_lr = s["bad"]
    targets = [TargetConfig(dataset=d, target=TARGETS[d][0], trigger="badnets_square",
                            trigger_params={"size": 10, "position": TARGETS[d][1], "color": 255})
               for d in args.datasets]
    badencoder = BadEncoderJob(encoder=pretrain.out, shadow=SSLDataConfig("cifar10", root, shadow), targets=targets,
                               train=sgd(bad_epochs, 256, bad_lr), seed=args.seed, out=str(out / "badencoder"))
    p_epochs, p_batch, p_lr, p_train, p_test = s["probe"]
    probe = ProbeConfig(epochs=p_epochs, batch_size=p_batch, lr=p_lr, train_limit=p_train, test_limit=p_test)
    d_epochs, ft_epochs, wu_epochs = s["defense"]
    defense = DefenseConfig(clean_fraction=0.05, train=quiet(adam_schedule(d_epochs, 128)),
                            finetune=quiet(adam_schedule(ft_epochs, 128)), warmup=quiet(adam_schedule(wu_epochs, 128)),
                            augment=AugmentConfig())
    if args.full:
        teachers, students, losses, cells = (["finetuned", "poisoned", "nad", "fine_pruning"],
                                             ["warmup", "random", "poisoned"],
                                             ["at", "fitnet", "afd", "cc", "kd", "sp"], "factorial")
    else:
        teachers, students, losses = ["finetuned", "poisoned"], ["warmup", "random"], ["at", "fitnet"]
        cells = args.cells
    grid = GridJob(encoder=badencoder.out, clean_encoder=pretrain.out, data=SSLDataConfig("cifar10", root, s["pool"]),
                   teachers=teachers, students=students, losses=losses, cells=cells, defense=defense,
                   datasets=list(args.datasets), probe=probe, seed=args.seed, out=str(out / "grid"))
    return pretrain, badencoder, grid


def baseline_probes(grid: GridJob) -> dict[str, dict]:
    """Downstream results of the clean and the poisoned encoder, both probed with the poisoned
    encoder's triggers (so the clean row shows the trigger's chance ASR), cached where the grid
    looks for its baseline rows."""
    poisoned, manifest = load_ssl_model(grid.encoder)
    clean, _ = load_ssl_model(grid.clean_encoder)
    targets = targets_from_manifest(manifest)
    downstream = load_downstream(list(grid.datasets), grid.data.root, tuple(poisoned.encoder.input_shape))
    base = Path(grid.out) / "baselines"
    return {name: cached_probe(base / name, model.encoder, downstream, targets, grid.probe, grid.seed)
            for name, model in (("clean", clean), ("poisoned", poisoned))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", default="runs/bench_ssl")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny settings that only check the wiring (= --scale smoke)")
    ap.add_argument("--datasets", nargs="+", default=["cifar10", "gtsrb"], choices=sorted(TARGETS))
    ap.add_argument("--cells", choices=["one_at_a_time", "factorial"], default="one_at_a_time")
    ap.add_argument("--full", action="store_true", help="the whole 4 × 3 × 6 study")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-epochs", type=int, help="override the scale's SimCLR epochs")
    ap.add_argument("--badencoder-epochs", type=int, help="override the scale's BadEncoder epochs")
    ap.add_argument("--badencoder-lr", type=float, help="override the scale's BadEncoder learning rate")
    ap.add_argument("--defense-epochs", type=int, help="override the scale's distillation epochs")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process (default: all cores; use 1 on a machine busy with other jobs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # also for the probes below; each job sets it (threads=)
    if args.smoke:
        args.scale = "smoke"
        if args.out == ap.get_default("out"):
            args.out = "runs/bench_ssl_smoke"
    t0 = time.perf_counter()
    pretrain, badencoder, grid = jobs(args)
    clean = run_pretrain(pretrain, threads=args.threads)
    print(f"pretrain: {json.dumps(clean.metrics)}")
    poisoned = run_badencoder_job(badencoder, threads=args.threads)
    print(f"badencoder: {json.dumps(poisoned.metrics)}")
    probes = baseline_probes(grid)
    probe_md = probe_table(list(probes.items()), list(args.datasets))
    print("\n## Clean vs BadEncoder encoder\n\n" + probe_md)
    weak = [d for d, r in probes["poisoned"].items() if r.get("asr") is not None and r["asr"] < 0.8]
    if weak:
        print(f"\nwarning: BadEncoder ASR is below 80 % on {', '.join(weak)}; raise --badencoder-epochs "
              "(a finished stage continues from its train_state.pt when only the epochs grow)")
    result = run_grid(grid, threads=args.threads)
    print("\n## Defence grid\n\n" + result.table)
    met = [r["label"] for r in result.rows if r.get("meets_goal")]
    verdict = (f"cells meeting the goal (mean ASR < {100 * grid.asr_goal:.0f} %, CA cost <= "
               f"{100 * grid.ca_cost_goal:.0f} pts): {', '.join(met) if met else 'none'}")
    print("\n" + verdict)
    out = Path(args.out)
    header = (f"scale {args.scale}, machine {machine_label()}, "
              f"wall {time.perf_counter() - t0:.0f} s this invocation")
    (out / "summary.md").write_text(f"# SSL track ({header})\n\n## Clean vs BadEncoder encoder\n\n{probe_md}\n\n"
                                    f"## Defence grid\n\n{result.table}\n\n{verdict}\n")
    (out / "summary.json").write_text(json.dumps({"scale": args.scale, "pretrain": clean.metrics,
                                                  "badencoder": poisoned.metrics, "probes": probes,
                                                  "grid": result.rows, "meets_goal": met}, indent=2))


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
