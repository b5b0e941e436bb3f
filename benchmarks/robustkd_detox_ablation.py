"""Which detoxification objective removes which backdoor: the detoxified teacher alone (issue 4).

RobustKD's distillation can only be as clean as the detoxified teacher it copies, so the
objective is compared here on the teacher itself, without the (minutes-long) distillation: each
variant optimises masks on the same clean share that ``robustkd_compare.py`` distils on (same
seed, same epochs) and the detoxified teacher is evaluated on the test split (CA, ASR, ASR
without trigger). Variants (``--variants``):

==================  ==============================================================================
``dormant``         the "dormant" form alone (the defaults of ``DetoxConfig``)
``variance``        the literal "variance" form
``adversarial``     "dormant" + the adversarial term (λ_a 1, ε 0.2, α 0.02)
``adversarial_only`` the adversarial term and fidelity only (λ_s = λ_v = 0)
``adversarial_w0.2`` "adversarial" with λ_a 0.2
``adversarial_eps0.1`` "adversarial" with ε 0.1, α 0.01
``adversarial_fixed`` "dormant" + the adversarial term with ``δ*`` searched on the original teacher
                    first (2 passes) and then fixed (λ_a 1, ε 0.2, α 0.02)
==================  ==============================================================================

Each variant is cached in ``<out>/<teacher name>/<variant>/result.json`` (with its masks), so the
table re-prints without recomputing. Usage::

    python benchmarks/robustkd_detox_ablation.py --data-root ../shared/data --out runs/rkd_detox \\
        --teachers runs/rkd/gtsrb/teacher_badnets runs/rkd/gtsrb/teacher_robustkd_blend
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from kdguard.checkpoint import load_model
from kdguard.config import DataConfig, TrainConfig
from kdguard.data import to_float
from kdguard.defenses.robustkd import DetoxConfig
from kdguard.io import write_json
from kdguard.attacks import attack_from_manifest, make_attack
from kdguard.data import clean_subset, load_splits
from kdguard.runs import evaluate_model
from kdguard.runtime import configure_threads, machine_label, resolve_device

VARIANTS = {
    "dormant": {},
    "variance": {"form": "variance"},
    "adversarial": {"adversarial_weight": 1.0},
    "adversarial_only": {"adversarial_weight": 1.0, "sparsity_weight": 0.0, "variance_weight": 0.0},
    "adversarial_w0.2": {"adversarial_weight": 0.2},
    "adversarial_eps0.1": {"adversarial_weight": 1.0, "epsilon": 0.1, "adversarial_step": 0.01},
    "adversarial_fixed": {"adversarial_weight": 1.0, "adversarial_against": "teacher"},
}


def run_variant(teacher_dir: Path, variant: str, out: Path, root: str | None, epochs: int, fraction: float,
                device: str, seed: int) -> dict:
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    teacher, manifest = load_model(teacher_dir)
    data = load_splits(DataConfig(name=manifest["dataset"]["name"], root=root), seed=seed)
    attack = make_attack(attack_from_manifest(manifest), data.train.shape, data.train.num_classes)
    clean = clean_subset(data, fraction, seed)
    cfg = replace(DetoxConfig(epochs=epochs), **VARIANTS[variant])
    dev = resolve_device(device)
    result = cfg.detoxify(teacher, clean, device=dev, seed=seed)
    train = TrainConfig(device=device)
    with result.detox.to(dev).attach(teacher):
        metrics = evaluate_model(teacher, data.test, attack, train_cfg=train).to_dict()
    result.detox.save(out / "detox.safetensors", {"teacher": str(teacher_dir), "variant": variant})
    steer = None if result.perturbation is None else _perturbation_effect(teacher, data.test.images,
                                                                          result.perturbation, dev)
    record = {"teacher": str(teacher_dir), "variant": variant, "settings": VARIANTS[variant], "epochs": epochs,
              "n_clean": len(clean), "seconds": result.seconds, "metrics": metrics,
              "summary": result.detox.summary(), "history": result.history,
              "perturbation_history": result.perturbation_history, "perturbation_effect": steer,
              "machine": machine_label(dev)}
    write_json(done, record)
    return record


@torch.no_grad()
def _perturbation_effect(teacher, images, delta, device) -> dict:
    """Where the final δ sends the *original* teacher's test predictions: the class it sends
    most images to and that share (does δ point at the backdoor's target?)."""
    teacher.eval()
    delta = delta.to(device)
    preds = torch.cat([teacher((to_float(images[i:i + 512], device) + delta).clamp(0, 1)).argmax(1).cpu()
                       for i in range(0, len(images), 512)])
    top = torch.bincount(preds).argmax()
    return {"top_class": int(top), "top_share": float((preds == top).float().mean())}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"  # a clean teacher has no attack, so no ASR


def table(rows: list[dict]) -> str:
    # δ → class: where the final δ alone sends the original teacher's test images (class, share %)
    lines = ["| teacher | variant | CA % | ASR % | ASR without trigger % | units masked % | δ → class | detox s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        masked = sum(s["fraction_masked"] for s in r["summary"].values()) / max(1, len(r["summary"]))
        effect = r.get("perturbation_effect")
        steer = "—" if not effect else f"{effect['top_class']} ({100 * effect['top_share']:.0f} %)"
        lines.append(f"| {Path(r['teacher']).name} | {r['variant']} | {_pct(m['ca'])} | {_pct(m.get('asr'))} | "
                     f"{_pct(m.get('asr_no_trigger'))} | {100 * masked:.0f} | {steer} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="runs/rkd_detox")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--epochs", type=int, default=10, help="detox epochs (robustkd_compare's recipes: 10)")
    ap.add_argument("--clean-fraction", type=float, default=0.2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    configure_threads()
    rows = []
    for t in args.teachers:
        for v in args.variants:
            rows.append(run_variant(Path(t), v, Path(args.out) / Path(t).name / v, args.data_root, args.epochs,
                                    args.clean_fraction, args.device, args.seed))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    from kdguard.log import configure_logging

    configure_logging()  # kdguard's progress lines on stderr, as the CLI prints them
    main()
