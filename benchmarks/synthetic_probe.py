"""What does a data-free run's synthetic data show the teacher? A diagnostic for backdoor transfer.

A data-free student can only inherit a backdoor through the teacher's answers on the synthetic
images it is trained on. This script restores the synthesizer (generator or image pool) of
finished or interrupted ``kdguard distill --method …`` runs from their ``datafree_state.pt`` and
reports, on ``--n`` synthetic images and on the real clean test images:

* how often the teacher predicts the target class, and its mean softmax probability of it
  (chance: 1/K; a generator that found the trigger's features drives both up);
* how often the student predicts the target class, and how often it agrees with the teacher;
* the teacher's ASR on the synthetic images *with* the trigger stamped on them (a check that the
  backdoor fires on the generator's distribution at all).

Two reference rows tell where a target preference comes from: the run's generator at round 0
(rebuilt with the run's seed, before training) and uniform noise in [0, 1]. A teacher that calls
those the target has a backdoor that fires on unstructured inputs, whatever the generator learns.

    python benchmarks/synthetic_probe.py RUN_DIR [RUN_DIR ...] [--n 2048] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdguard.jobs import build_datafree_job
from kdguard.datafree.methods import build_method
from kdguard.jobs import prepare_datafree
from kdguard.runtime import seed_everything


@torch.inference_mode()
def predictions(model: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Softmax outputs ``N×K`` (float32) of ``model`` on float images ``x`` in [0, 1]."""
    return torch.cat([model(x[i:i + batch]).float().softmax(1) for i in range(0, len(x), batch)])


@torch.no_grad()
def draw(synthesizer, n: int, rng: torch.Generator) -> torch.Tensor:
    """``n`` fresh synthetic images: from the generator with new latents (as in training, BN in
    train mode) when there is one, else from the synthesizer's pool."""
    generator = getattr(synthesizer, "generator", None)
    if generator is None:
        return synthesizer.sample(n).float().cpu()
    generator.train()
    return generator(torch.randn(n, generator.latent_dim, generator=rng)).float().cpu()


def draw_many(synthesizer, n: int, rng: torch.Generator, chunk: int = 256) -> torch.Tensor:
    """``n`` synthetic images drawn ``chunk`` at a time (bounds the generator's memory)."""
    return torch.cat([draw(synthesizer, min(chunk, n - i), rng) for i in range(0, n, chunk)])


def rebuild_run(run: Path, data_root: str | None = None):
    """A data-free run's teacher, test split, attack, student and method parts, rebuilt from its
    ``config.yaml`` with the run's seed, plus its ``datafree_state.pt`` (weights-only load).
    Nothing is restored yet: the synthesizer and student are as the run started them.

    Returns:
        ``(job, setup, parts, state)``: the run's job, its
        :class:`~kdguard.jobs.datafree.DataFreeSetup`, the method's parts, and the checkpoint dict.
    """
    job = build_datafree_job(run / "config.yaml", [f"data.root={data_root}"] if data_root else [])
    seed_everything(job.seed)  # as the run did before building its student and generator
    setup = prepare_datafree(job)  # the teacher, test split, attack and student exactly as the run built them
    parts = build_method(job, setup.ctx)
    state = torch.load(run / "datafree_state.pt", map_location="cpu", weights_only=True)
    return job, setup, parts, state


def real_test_images(test, n: int) -> torch.Tensor:
    """A seeded random subset of ``n`` clean test images, float ``n×C×H×W`` in [0, 1] (the
    image-folder test split is sorted by class, so its head would be one class)."""
    pick = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(0))[:n]
    return test.images[pick].float().div(255.0)


def probe(run: Path, n: int, data_root: str | None) -> dict:
    job, setup, parts, state = rebuild_run(run, data_root)
    teacher, student, test, attack = setup.teacher, setup.student, setup.test, setup.attack
    target = int(attack.target)
    images: list[tuple[str, torch.Tensor]] = []
    if getattr(parts.synthesizer, "generator", None) is not None:
        # built with the run's seed and not yet restored: the generator the run started from
        images.append(("generator at round 0", draw_many(parts.synthesizer, n, torch.Generator().manual_seed(0))))
    student.load_state_dict(state["student"])
    student.eval()
    parts.synthesizer.load_state_dict(state["synthesizer"])
    torch.manual_seed(0)  # pools sample with the global generator
    synth = draw_many(parts.synthesizer, n, torch.Generator().manual_seed(0))
    real = real_test_images(test, n)
    noise = torch.rand(n, *real.shape[1:], generator=torch.Generator().manual_seed(1))
    images = [("synthetic", synth), *images, ("real clean test", real), ("uniform noise", noise)]
    rows = {}
    for name, x in images:
        pt, ps = predictions(teacher, x), predictions(student, x)
        rows[name] = {"teacher_target_share": (pt.argmax(1) == target).float().mean().item(),
                      "teacher_target_prob": pt[:, target].mean().item(),
                      "student_target_share": (ps.argmax(1) == target).float().mean().item(),
                      "agreement": (pt.argmax(1) == ps.argmax(1)).float().mean().item()}
    # the trigger needs images in [0, 1]; generator outputs may lie outside (output="affine")
    stamped = attack.trigger(synth.clamp(0, 1))
    not_target = predictions(teacher, synth.clamp(0, 1)).argmax(1) != target
    # None when the teacher already calls every synthetic image the target (nothing to flip)
    rows["synthetic"]["teacher_asr_with_trigger"] = None if not not_target.any() else \
        (predictions(teacher, stamped).argmax(1)[not_target] == target).float().mean().item()
    rows["synthetic"]["outside_unit_range"] = ((synth < 0) | (synth > 1)).float().mean().item()
    return {"run": str(run), "method": job.method, "round": int(state["round"]), "target": target,
            "n": n, "chance": 1.0 / test.num_classes, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = [probe(r, args.n, args.data_root) for r in args.runs]
    print("| run | round | images | teacher → target % | teacher p(target) | student → target % | "
          "student = teacher % | teacher ASR with trigger % |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for name, r in res["rows"].items():
            asr = r.get("teacher_asr_with_trigger")
            print(f"| {Path(res['run']).name} | {res['round']} | {name} | {100 * r['teacher_target_share']:.1f} | "
                  f"{r['teacher_target_prob']:.3f} | {100 * r['student_target_share']:.1f} | "
                  f"{100 * r['agreement']:.1f} | {'—' if asr is None else f'{100 * asr:.1f}'} |")
    for res in results:
        print(f"\n{Path(res['run']).name}: {100 * res['rows']['synthetic']['outside_unit_range']:.1f} % of the "
              "synthetic pixel values lie outside [0, 1] (clamped before the trigger is stamped)")
    print(f"\nchance {100 * results[0]['chance']:.1f} %; {time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
