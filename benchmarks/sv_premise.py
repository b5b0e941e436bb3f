"""Does the Shuffling Vaccine's premise hold on a teacher? Flag shares on real clean and triggered images.

ABD's Shuffling Vaccine (Hong et al., ICML 2023, §4.1) flags a sample as suspicious when the
shuffled teacher T̃ (input channels of the last convolutions permuted) still predicts what the
teacher T predicts. The premise is that shuffling breaks the clean function, which relies on
many channels, but leaves the trigger → target shortcut standing. If triggered images are not
flagged more often than clean ones, SV cannot steer the generator away from them, whatever it
synthesises.

For each teacher run this script takes ``--n`` clean test images outside the target class
(seeded), stamps the teacher's own trigger on them, and reports for both sets:

* how often T predicts the target class (on the triggered set: the teacher's ASR), and how
  often T̃ does (a T̃ that calls everything the target flags exactly what T calls the target);
* the share SV would flag (``argmax T̃ = argmax T``), over all images and, on the triggered
  set, over the backdoor hits only (T predicts the target);
* the median ``log10`` of the SV divergence ``KL(T ‖ T̃) / K``;

for ``--shuffles`` independent shuffles built as ``build_abd`` builds them for seeds 0, 1, …,
an ensemble of 3), as the mean and range over the shuffles, and for each number of shuffled
layers in ``--layers`` (``abd.sv.layers``; ABD's default is 5).

The triggered images are oracle data a defender does not have: this checks the mechanism on a
teacher whose trigger is known, it is not a defence.

    python benchmarks/sv_premise.py TEACHER_RUN [TEACHER_RUN ...] --data-root ../shared/data \\
        [--n 2000] [--shuffles 5] [--layers 1 2 3 5] [--threads 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdguard.abd.plugin import SHUFFLE_SEED_OFFSET
from kdguard.abd.shuffle import ShuffledTeacher
from kdguard.abd.vaccine import divergence_per_sample
from kdguard.checkpoint import load_model
from kdguard.data import load_dataset
from kdguard.errors import KDGuardError
from kdguard.attacks import attack_from_manifest, make_attack


@torch.inference_mode()
def logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Float32 logits ``N×K`` of ``model`` on float images ``x`` in [0, 1]."""
    return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def probe_teacher(run: Path, data_root: str, n: int, shuffles: int, layers: int) -> dict:
    """The flag shares of one teacher run with ``layers`` shuffled layers (module docstring).

    Returns:
        ``{"run", "attack", "target", "n", "layers", "shuffled_layers", "shuffles", "rows"}``;
        ``rows["clean"|"triggered"]`` hold ``teacher_target_share`` (a fraction) and, one entry
        per shuffle, ``shuffled_target_share``, ``flagged``, ``flagged_hits`` (fractions; None
        without backdoor hits) and ``median_log10_div``. ``n`` is at most the non-target test
        images available.

    Raises:
        KDGuardError: unreadable teacher, or a manifest without dataset or attack.
    """
    teacher, manifest = load_model(run)
    teacher.eval()
    dataset, attack_cfg = (manifest.get("dataset") or {}).get("name"), attack_from_manifest(manifest)
    if dataset is None or attack_cfg is None:
        raise KDGuardError(f"{run}: the manifest names no dataset or no attack",
                           "give a backdoored teacher's run directory (kdguard train with an attack)")
    test = load_dataset(dataset, "test", root=data_root)
    attack = make_attack(attack_cfg, test.shape, test.num_classes)
    target = int(attack.target)
    keep = (test.labels != target).nonzero().squeeze(1)
    keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))[:n]]
    clean = test.images[keep].float().div(255.0)
    sets = {"clean": clean, "triggered": attack.trigger(clean)}
    t_logits = {name: logits(teacher, x) for name, x in sets.items()}
    t_pred = {name: t.argmax(1) for name, t in t_logits.items()}
    t_hits = {name: pred == target for name, pred in t_pred.items()}
    rows: dict[str, dict] = {name: {"teacher_target_share": float(t_hits[name].float().mean()),
                                    "shuffled_target_share": [], "flagged": [], "flagged_hits": [],
                                    "median_log10_div": []}
                             for name in t_logits}
    example = torch.zeros((2, *test.shape))
    paths = None
    for s in range(shuffles):
        shuffled = ShuffledTeacher(teacher, example, layers=layers,
                                   generator=torch.Generator().manual_seed(s + SHUFFLE_SEED_OFFSET))
        paths = list(shuffled.paths)
        for name, x in sets.items():
            t, ts = t_logits[name], logits(shuffled, x)
            s_pred = ts.argmax(1)
            flag, hits = s_pred == t_pred[name], t_hits[name]
            row = rows[name]
            row["shuffled_target_share"].append(float((s_pred == target).float().mean()))
            row["flagged"].append(float(flag.float().mean()))
            row["flagged_hits"].append(float(flag[hits].float().mean()) if hits.any() else None)
            row["median_log10_div"].append(float(divergence_per_sample(t, ts).clamp_min(1e-12).log10().median()))
    return {"run": str(run), "attack": attack_cfg.name, "target": target, "n": len(keep),
            "layers": layers, "shuffled_layers": paths, "shuffles": shuffles, "rows": rows}


def spread(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "—"
    mean = sum(vals) / len(vals)
    return f"{mean:.2f} ({min(vals):.2f}–{max(vals):.2f})"


def pct(values: list) -> str:
    return spread([None if v is None else 100 * v for v in values])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="teacher run directories (model.safetensors + manifest.json)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--shuffles", type=int, default=5)
    ap.add_argument("--layers", type=int, nargs="+", default=[5], help="numbers of shuffled layers to try")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [probe_teacher(r, args.data_root, args.n, args.shuffles, k) for r in args.runs for k in args.layers]
    print("| teacher | layers | images | T → target % | T̃ → target % | flagged % | flagged among T → target % "
          "| median log10 D |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for name, r in res["rows"].items():
            print(f"| {Path(res['run']).name} | {res['layers']} | {name} | {100 * r['teacher_target_share']:.2f} | "
                  f"{pct(r['shuffled_target_share'])} | {pct(r['flagged'])} | {pct(r['flagged_hits'])} | {spread(r['median_log10_div'])} |")
    print(f"\n{results[0]['n']} non-target test images per teacher, {args.shuffles} shuffles each "
          f"(mean, range); the most layers shuffled: {results[-1]['shuffled_layers']}; "
          f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
