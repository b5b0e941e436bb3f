"""Diagnostics that explain a measured transfer (``kdguard probe ...``, docs/abd-results.md,
docs/datafree-results.md, docs/losses.md): what a teacher, a synthesizer or a perturbation does
on real, triggered and synthetic images. They read finished (or stopped) run directories and
use the *known* trigger of the teacher's manifest: oracle checks of a mechanism on a teacher
whose backdoor is known, not defences.

* :func:`sv_premise`: does the Shuffling Vaccine's premise hold? (ABD, Hong et al., ICML 2023,
  §4.1: triggered images keep the teacher's prediction under shuffling, clean ones lose it.)
* :func:`synthetic_probe`: what a data-free run's synthetic images show the teacher (the target
  share and probability on synthetic, round-0, real and noise images; the teacher's ASR on
  stamped synthetic images).
* :func:`sr_perturbation_probe`: what Self-Retrospection's universal perturbation δ (ABD §4.2)
  does to the teacher at a checkpoint: sends synthetic batches and real test images to the
  target? concentrated on the trigger's pixels?
* :func:`target_share`: how much of a model's non-true-class distribution on clean images points
  at the target class (what logit KD's dark knowledge passes on).
* :func:`target_bias`: is a low ASR an unlearned trigger or a suppressed target class? The
  model's CA, target-class CA, ASR and no-trigger rate with an offset added to its target logit.

Images are float ``N×C×H×W`` in [0, 1]; shares are fractions in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import KDGuardError


@torch.inference_mode()
def _outputs(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Float32 logits ``N×K`` of ``model`` on ``x``."""
    return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def _seeded_subset(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def _model_test_attack(run: str | Path, data_root: str | None, fix: str,
                       attack_run: str | Path | None = None) -> tuple[nn.Module, Any, Any, Any]:
    """The model of ``run`` (eval mode), its dataset's test split and the attack its manifest (or
    ``attack_run``'s) records, built for that split: ``(model, test, attack, attack_cfg)``.

    Raises:
        KDGuardError: an unreadable model, or a manifest naming no dataset or no attack (``fix``
            is the remedy the message gives).
    """
    from .attacks import attack_from_manifest, make_attack
    from .checkpoint import load_model, read_manifest
    from .data import load_dataset

    model, manifest = load_model(run)
    model.eval()
    dataset = (manifest.get("dataset") or {}).get("name")
    attack_cfg = attack_from_manifest(read_manifest(attack_run) if attack_run is not None else manifest)
    if dataset is None or attack_cfg is None:
        raise KDGuardError(f"{run}: the manifest names no dataset or no attack", fix)
    test = load_dataset(dataset, "test", root=data_root)
    return model, test, make_attack(attack_cfg, test.shape, test.num_classes), attack_cfg


# -- the Shuffling Vaccine's premise -------------------------------------------------------------

def sv_premise(run: str | Path, *, data_root: str | None = None, n: int = 2000, shuffles: int = 5,
               layers: int = 5) -> dict[str, Any]:
    """Flag shares of ABD's Shuffling Vaccine on a backdoored teacher's clean and triggered test images.

    Takes ``n`` non-target test images (seeded), stamps the manifest's trigger on them, and for
    ``shuffles`` shuffled teachers built as ABD builds them (``layers`` shuffled layers, seeds
    as :func:`kdguard.abd.build_abd`) reports per set: the teacher's target share; per shuffle the
    shuffled teacher's target share, the share SV flags (``argmax T̃ = argmax T``), that share
    among the teacher's backdoor hits (None without hits), and the median ``log10`` of the SV
    divergence.

    Raises:
        KDGuardError: an unreadable teacher, or a manifest naming no dataset or no attack.
    """
    from .abd.plugin import SHUFFLE_SEED_OFFSET
    from .audit.shuffle_check import ShuffleCheck, ShuffleProbe

    teacher, test, attack, attack_cfg = _model_test_attack(
        run, data_root, "give a backdoored teacher's run directory (kdguard train-teacher with an attack)")
    target = int(attack.target)
    keep = (test.labels != target).nonzero().squeeze(1)
    keep = keep[_seeded_subset(len(keep), n)]
    clean = test.images[keep].float().div(255.0)
    sets = {"clean": clean, "triggered": attack.trigger(clean)}
    # ABD's shuffled teachers: shuffle r is built as build_abd builds it for seed r
    probe = ShuffleProbe(teacher, torch.zeros((2, *test.shape)), ShuffleCheck(layers=layers, rounds=shuffles),
                         seed=SHUFFLE_SEED_OFFSET)
    rows: dict[str, dict[str, Any]] = {}
    for name, x in sets.items():
        t_pred, s_pred, divs = probe.predict(x)  # N, R×N, R×N
        hits = t_pred == target
        flags = s_pred == t_pred
        rows[name] = {"teacher_target_share": float(hits.float().mean()),
                      "shuffled_target_share": [float((p == target).float().mean()) for p in s_pred],
                      "flagged": [float(f.float().mean()) for f in flags],
                      "flagged_hits": [float(f[hits].float().mean()) if hits.any() else None for f in flags],
                      "median_log10_div": [float(d.clamp_min(1e-12).log10().median()) for d in divs]}
    paths = probe.paths
    return {"run": str(run), "attack": attack_cfg.name, "target": target, "n": len(keep), "layers": layers,
            "shuffled_layers": paths, "shuffles": shuffles, "rows": rows}


# -- a data-free run's synthetic images ----------------------------------------------------------

def rebuild_datafree_run(run: str | Path, data_root: str | None = None) -> tuple[Any, Any, Any, dict]:
    """A data-free run's job, set-up (teacher, test split, attack, student) and method parts,
    rebuilt from its ``config.yaml`` with the run's seed, and its checkpoint (weights-only load).
    Nothing is restored yet: the synthesizer and the student are as the run started them.

    Raises:
        KDGuardError: ``run`` holds no checkpoint and config, or the job cannot be rebuilt.
    """
    from .datafree.methods import build_method
    from .jobs.datafree import build_datafree_job, prepare_datafree, stopped_run_config
    from .runtime import seed_everything

    run = Path(run)
    job = build_datafree_job(stopped_run_config(run), [f"data.root={data_root}"] if data_root else [])
    seed_everything(job.seed)  # as the run did before building its student and generator
    setup = prepare_datafree(job)
    parts = build_method(job, setup.ctx)
    state = torch.load(run / "datafree_state.pt", map_location="cpu", weights_only=True)
    return job, setup, parts, state


@torch.no_grad()
def draw_synthetic(synthesizer: Any, n: int, rng: torch.Generator, chunk: int = 256) -> torch.Tensor:
    """``n`` fresh synthetic images (float, CPU): from the generator with new latents (BN in
    train mode, as in training) when there is one, else from the synthesizer's pool."""
    generator = getattr(synthesizer, "generator", None)
    out = []
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        if generator is None:
            out.append(synthesizer.sample(m).float().cpu())
        else:
            generator.train()
            out.append(generator(torch.randn(m, generator.latent_dim, generator=rng)).float().cpu())
    return torch.cat(out)


def real_test_images(test: Any, n: int) -> torch.Tensor:
    """A seeded random subset of ``n`` clean test images, float ``n×C×H×W`` in [0, 1] (an
    image-folder test split is sorted by class, so its head would be one class)."""
    return test.images[_seeded_subset(len(test.images), n)].float().div(255.0)


def synthetic_probe(run: str | Path, *, n: int = 2048, data_root: str | None = None) -> dict[str, Any]:
    """What a data-free run's synthesizer shows the teacher, against real and noise images.

    Rows: ``synthetic`` (the checkpoint's synthesizer), ``generator at round 0`` (rebuilt with the
    run's seed, generator methods only), ``real clean test``, ``uniform noise``; each with the
    teacher's target share and mean target probability, the student's target share and the
    teacher-student agreement. ``synthetic`` adds the teacher's ASR on the stamped synthetic images
    (None when it already calls all of them the target) and the share of pixel values outside [0, 1].

    Raises:
        KDGuardError: as :func:`rebuild_datafree_run`.
    """
    job, setup, parts, state = rebuild_datafree_run(run, data_root)
    teacher, student, test, attack = setup.teacher, setup.student, setup.test, setup.attack
    target = int(attack.target)
    round0 = []
    if getattr(parts.synthesizer, "generator", None) is not None:
        round0 = [("generator at round 0", draw_synthetic(parts.synthesizer, n, torch.Generator().manual_seed(0)))]
    student.load_state_dict(state["student"])
    student.eval()
    parts.synthesizer.load_state_dict(state["synthesizer"])
    torch.manual_seed(0)  # pools sample with the global generator
    synth = draw_synthetic(parts.synthesizer, n, torch.Generator().manual_seed(0))
    real = real_test_images(test, n)
    noise = torch.rand(n, *real.shape[1:], generator=torch.Generator().manual_seed(1))
    rows = {}
    for name, x in [("synthetic", synth), *round0, ("real clean test", real), ("uniform noise", noise)]:
        pt, ps = _outputs(teacher, x).softmax(1), _outputs(student, x).softmax(1)
        rows[name] = {"teacher_target_share": (pt.argmax(1) == target).float().mean().item(),
                      "teacher_target_prob": pt[:, target].mean().item(),
                      "student_target_share": (ps.argmax(1) == target).float().mean().item(),
                      "agreement": (pt.argmax(1) == ps.argmax(1)).float().mean().item()}
    inside = synth.clamp(0, 1)  # a trigger needs [0, 1]; generator outputs may lie outside
    not_target = _outputs(teacher, inside).argmax(1) != target
    rows["synthetic"]["teacher_asr_with_trigger"] = None if not not_target.any() else \
        (_outputs(teacher, attack.trigger(inside)).argmax(1)[not_target] == target).float().mean().item()
    rows["synthetic"]["outside_unit_range"] = ((synth < 0) | (synth > 1)).float().mean().item()
    return {"run": str(run), "method": job.method, "round": int(state["round"]), "target": target, "n": n,
            "chance": 1.0 / test.num_classes, "rows": rows}


# -- Self-Retrospection's perturbation ------------------------------------------------------------

def sr_perturbation_probe(run: str | Path, *, batches: int = 10, batch: int = 128, steps: int = 10,
                          lr: float = 0.1, l2: float = 1e-3, n_real: int = 1000,
                          data_root: str | None = None) -> dict[str, Any]:
    """SR's universal perturbation against the teacher, at a data-free checkpoint.

    On ``batches`` synthetic batches, δ is computed as SR computes it against the teacher
    (:func:`kdguard.abd.retrospection.universal_perturbation`, normalised units; the image gets
    ``std·δ``). Returns the share of batches whose δ sends the teacher's majority answer on
    ``x + δ`` to the target, the mean share of ``n_real`` real test images the same δ sends there,
    δ's mean energy share on the trigger's pixels and those pixels' share of the image, and the
    largest ``|std·δ|`` (pixel units).

    Raises:
        KDGuardError: as :func:`rebuild_datafree_run`.
    """
    from .abd.retrospection import universal_perturbation

    _, setup, parts, state = rebuild_datafree_run(run, data_root)
    teacher, attack = setup.teacher, setup.attack
    target = int(attack.target)
    parts.synthesizer.load_state_dict(state["synthesizer"])
    std = torch.tensor(setup.ctx.std, dtype=torch.float32).view(1, -1, 1, 1)
    real = real_test_images(setup.test, n_real)
    shape = (1, *real.shape[1:])  # pixels the trigger changes on a black or a white image
    on_trigger = (attack.trigger(torch.zeros(shape)) != 0) | (attack.trigger(torch.ones(shape)) != 1)
    rng = torch.Generator().manual_seed(0)
    to_target, real_to_target, energy, peak = [], [], [], 0.0
    for _ in range(batches):
        x = draw_synthetic(parts.synthesizer, batch, rng)
        with torch.no_grad():  # not inference mode: δ's search differentiates through it
            ref = teacher(x).float()
        d = std * universal_perturbation(teacher, x, ref, steps=steps, lr=lr, l2=l2, scale=std)
        to_target.append(float((_outputs(teacher, x + d).argmax(1) == target).float().mean() > 0.5))
        real_to_target.append((_outputs(teacher, real + d).argmax(1) == target).float().mean().item())
        e = d.detach().pow(2)
        energy.append(((e * on_trigger).sum() / e.sum().clamp_min(1e-20)).item())
        peak = max(peak, d.detach().abs().max().item())
    return {"run": str(run), "round": int(state["round"]), "batches_to_target": sum(to_target) / batches,
            "real_to_target": sum(real_to_target) / batches, "trigger_energy": sum(energy) / batches,
            "trigger_pixels": on_trigger.float().mean().item(), "max_abs_delta": peak}


# -- dark knowledge towards the target --------------------------------------------------------------

@torch.inference_mode()
def target_share(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int,
                 temperature: float = 4.0, batch_size: int = 500) -> tuple[float, float]:
    """The target's mean share of ``model``'s softmax at ``temperature`` renormalised over the
    non-true classes (what DKD's NCKD part matches; ``1/(K−1)`` without preference), and the share
    of images whose top non-true class is the target. ``images``: uint8 or float, ``labels``: ``N``."""
    from .data.batches import iterate_batches, to_float

    model.eval()
    shares, tops = [], []
    for xb, yb in iterate_batches((images, labels), batch_size, shuffle=False):
        p = F.softmax(model(to_float(xb)).float() / temperature, dim=1).scatter(1, yb[:, None], 0.0)
        p = p / p.sum(1, keepdim=True)
        shares.append(p[:, target])
        tops.append(p.argmax(1) == target)
    return torch.cat(shares).mean().item(), torch.cat(tops).float().mean().item()


# -- a removed backdoor or a suppressed class? -------------------------------------------------------

@torch.inference_mode()
def target_bias(run: str | Path, *, offsets: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0),
                data_root: str | None = None, attack_run: str | Path | None = None) -> dict[str, Any]:
    """CA, target-class CA, ASR and no-trigger rate of a model when ``b`` is added to its target
    logit, for each ``b`` in ``offsets`` (logit units; 0 = the model as it is).

    A defence can reach ASR 0 by making the model stop predicting the target class: then its
    target-class CA is low as well, and raising the target logit until the target-class CA is back
    brings the trigger's hits back too. A model whose trigger response is gone keeps its ASR near
    its no-trigger rate at every offset. One pass over the clean and the triggered test split.

    Args:
        run: a run directory whose manifest names the dataset and, unless ``attack_run`` is given,
            the attack (a data-free or distilled student records its teacher's).
        attack_run: take the attack from this run's manifest instead.

    Returns:
        ``{"run", "attack", "target", "rows": [{"offset", "ca", "target_ca", "asr", "asr_no_trigger"}]}``
        (fractions in [0, 1]).

    Raises:
        KDGuardError: an unreadable model, or a manifest naming no dataset or no attack.
    """
    from .metrics import backdoor_metrics

    model, test, attack, attack_cfg = _model_test_attack(
        run, data_root, "give a run distilled from a backdoored teacher, or --attack-from TEACHER_RUN",
        attack_run)
    if attack.label_mode != "all_to_one":
        raise KDGuardError(f"{run}: the attack is all-to-all; the probe needs one target class",
                           "give a run of an all-to-one attack")
    target = int(attack.target)
    clean = test.images.float().div(255.0)
    labels = test.labels
    logits_clean = _outputs(model, clean)
    logits_trig = _outputs(model, attack.trigger(clean))
    targets = torch.full_like(labels, target)
    rows = []
    for b in offsets:
        shift = torch.zeros(logits_clean.shape[1])
        shift[target] = float(b)
        m = backdoor_metrics(labels, (logits_clean + shift).argmax(1), (logits_trig + shift).argmax(1),
                             targets, labels != target)
        rows.append({"offset": float(b), "ca": m.ca, "target_ca": m.target_ca, "asr": m.asr,
                     "asr_no_trigger": m.asr_no_trigger})
    return {"run": str(run), "attack": attack_cfg.name, "target": target, "rows": rows}
