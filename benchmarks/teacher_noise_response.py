"""What a (backdoored) teacher answers on noise: why data-free synthesis can collapse onto its target.

A data-free generator starts from noise-like images. A teacher whose backdoor fires on any
noise-like image answers its target class there, with probability ≈ 1, and the generator's
KL(teacher ‖ student) then has no gradient to leave that class (``docs/abd.md`` §3.4, Blend). For
each teacher checkpoint this prints, on 500 images each of uniform noise U(0, 1), Gaussian noise
N(0.5, 0.25²) clipped to [0, 1] and flat mid-grey, the share of images answered with the target
class (from the checkpoint's manifest) and the mean softmax probability of that class.

    python benchmarks/teacher_noise_response.py benchmarks/results/datafree_transfer/cifar10/teachers/*_s0

No data set is read. Images are 0-1 scaled in the teacher's input shape (from its manifest).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kdguard.checkpoint import load_model


def probes(shape: tuple[int, ...], n: int, seed: int) -> dict[str, torch.Tensor]:
    """The noise inputs, each (n, C, H, W) in [0, 1], from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return {"uniform U(0,1)": torch.rand(n, *shape, generator=g),
            "gaussian N(0.5,0.25²)": (0.5 + 0.25 * torch.randn(n, *shape, generator=g)).clamp(0, 1),
            "grey 0.5": torch.full((n, *shape), 0.5)}


@torch.inference_mode()
def noise_response(model: torch.nn.Module, inputs: torch.Tensor, target: int) -> tuple[float, float]:
    """(share of images answered ``target``, mean softmax probability of ``target``)."""
    probs = model(inputs).float().softmax(dim=1)
    return float((probs.argmax(dim=1) == target).float().mean()), float(probs[:, target].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teachers", nargs="+", help="teacher run directories (with manifest.json)")
    ap.add_argument("-n", type=int, default=500, help="images per noise kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| teacher | attack | target | input | answered target % | mean p(target) |")
    print("|---|---|---|---|---|---|")
    for path in args.teachers:
        model, manifest = load_model(path)
        attack = (manifest.get("attack") or {}).get("config") or {}
        if attack.get("target") is None:
            raise SystemExit(f"{path}: the manifest names no attack target; only backdoored teachers apply")
        target = int(attack["target"])
        shape = tuple(manifest["dataset"]["shape"])
        for kind, x in probes(shape, args.n, args.seed).items():
            share, p = noise_response(model, x, target)
            print(f"| {Path(path).name} | {attack.get('name', '?')} | {target} | {kind} | {100 * share:.1f} | {p:.3f} |")


if __name__ == "__main__":
    main()
