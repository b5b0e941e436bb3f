"""How much of a model's "dark knowledge" on clean images points at the backdoor's target class.

Logit KD and DKD pass on the teacher's distribution over the *non-true* classes (DKD's NCKD
part weighs it by β = 8). A backdoored teacher tends to rank the target class second on clean
images, so that distribution carries part of the backdoor to a student trained on clean data
only. For each model this prints, on clean test images whose true class is not the target:

* the mean share of the target class in the softmax at temperature τ renormalised over the
  non-true classes (what NCKD matches; 1/(K−1) if the model had no preference), and
* how often the target is the top non-true class.

    python benchmarks/target_share.py --data-root ../shared/data \\
        runs/bench_real/cifar10/teacher_resnet20_e60 runs/bench_defenses/clean20/defense-ft
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kdguard.checkpoint import load_model, read_manifest
from kdguard.config import DataConfig
from kdguard.data.batches import iterate_batches, to_float
from kdguard.data import load_splits


@torch.inference_mode()
def target_share(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int,
                 temperature: float, batch_size: int = 500) -> tuple[float, float]:
    """(mean target share of the non-true distribution, share of images where it is top)."""
    model.eval()
    shares, tops = [], []
    for xb, yb in iterate_batches((images, labels), batch_size, shuffle=False):
        p = F.softmax(model(to_float(xb)).float() / temperature, dim=1)
        p = p.scatter(1, yb[:, None], 0.0)
        p = p / p.sum(1, keepdim=True)
        shares.append(p[:, target])
        tops.append(p.argmax(1) == target)
    return torch.cat(shares).mean().item(), torch.cat(tops).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories of models (teacher, defended, students)")
    ap.add_argument("--data-root", default=None, help="dataset root (else $KDGUARD_DATA_ROOT)")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--target", type=int, default=None, help="target class (default: the first run's attack)")
    args = ap.parse_args(argv)

    first = read_manifest(args.runs[0])
    target = args.target if args.target is not None else first.get("attack", {}).get("target", 0)
    data = load_splits(DataConfig(name=first["dataset"]["name"], root=args.data_root), seed=0)
    keep = data.test.labels != target
    images, labels = data.test.images[keep], data.test.labels[keep]
    uniform = 1 / (data.test.num_classes - 1)
    print(f"{len(labels)} clean test images of non-target classes; target {target}; τ = {args.temperature:g}; "
          f"no preference = {uniform:.3f}\n")
    print("| model | target share of the non-true distribution | target is the top non-true class |")
    print("|---|---|---|")
    for run in args.runs:
        model, _ = load_model(run)
        share, top = target_share(model, images, labels, target, args.temperature)
        print(f"| `{run}` | {share:.3f} | {100 * top:.1f} % |")


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
