"""What does Self-Retrospection's perturbation δ do to the teacher? A diagnostic on checkpoints.

For each data-free run directory (a finished or stopped ``kdguard distill --method …`` run, e.g.
the shared runs of ``benchmarks/abd_sr_sweep.py``), the synthesizer is restored from
``datafree_state.pt``, ``--batches`` synthetic batches are drawn, and on each the universal
perturbation is computed exactly as SR computes it against the teacher
(:func:`kdguard.abd.retrospection.universal_perturbation`, δ in normalised units, the image gets
``std·δ``). Printed per run: the share of batches whose δ sends the teacher's majority answer on
x + δ to the target class, the share of real clean test images that the same δ sends there, the
share of δ's energy on the trigger's pixels (next to those pixels' share of the image), and the
largest |δ| in pixel units (docs/abd-results.md §2).

    python benchmarks/abd_sr_probe.py runs/abd_sr_sweep/zskt_shared_s{0,1,2} --inner-lr 0.3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from synthetic_probe import draw, real_test_images, rebuild_run

from kdguard.abd.retrospection import universal_perturbation


def probe(run: Path, *, batches: int, batch: int, steps: int, lr: float, l2: float, n_real: int,
          data_root: str | None = None) -> dict:
    _, setup, parts, state = rebuild_run(run, data_root)
    teacher, attack = setup.teacher, setup.attack
    target = int(attack.target)
    parts.synthesizer.load_state_dict(state["synthesizer"])
    std = torch.tensor(setup.ctx.std, dtype=torch.float32).view(1, -1, 1, 1)
    real = real_test_images(setup.test, n_real)
    # pixels the trigger changes on a black and on a white image
    shape = (1, *real.shape[1:])
    on_trigger = (attack.trigger(torch.zeros(shape)) != 0) | (attack.trigger(torch.ones(shape)) != 1)
    rng = torch.Generator().manual_seed(0)
    to_target, real_to_target, energy, peak = [], [], [], 0.0
    for _ in range(batches):
        x = draw(parts.synthesizer, batch, rng)
        with torch.no_grad():
            ref = teacher(x)
        d = std * universal_perturbation(teacher, x, ref, steps=steps, lr=lr, l2=l2, scale=std)
        with torch.no_grad():
            to_target.append(float((teacher(x + d).argmax(1) == target).float().mean() > 0.5))
            real_to_target.append((teacher(real + d).argmax(1) == target).float().mean().item())
        e = d.pow(2)
        energy.append(((e * on_trigger).sum() / e.sum()).item())
        peak = max(peak, d.abs().max().item())
    return {"run": run.name, "round": int(state["round"]), "batches_to_target": sum(to_target) / batches,
            "real_to_target": sum(real_to_target) / batches, "trigger_energy": sum(energy) / batches,
            "trigger_pixels": on_trigger.float().mean().item(), "max_abs_delta": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--n-real", type=int, default=1000)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    print("| run | round | batches whose δ → target | real test + δ → target | δ energy on trigger px "
          "(their share) | max abs δ (pixels) |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = probe(run, batches=args.batches, batch=args.batch, steps=args.inner_steps, lr=args.inner_lr,
                  l2=args.l2, n_real=args.n_real, data_root=args.data_root)
        print(f"| {r['run']} | {r['round']} | {100 * r['batches_to_target']:.0f} % | {100 * r['real_to_target']:.0f} % "
              f"| {100 * r['trigger_energy']:.1f} % ({100 * r['trigger_pixels']:.1f} %) | {r['max_abs_delta']:.2f} |",
              flush=True)


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
