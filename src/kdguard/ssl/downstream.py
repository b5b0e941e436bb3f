"""Downstream evaluation of SSL encoders: backdoor targets from configs, probes on several
datasets, their means and the Markdown table (used by the SSL jobs, :mod:`kdguard.jobs.ssl`)."""

from __future__ import annotations

from typing import Any

from ..attacks.triggers import build_trigger
from ..data import ImageDataset
from ..errors import KDGuardError
from .badencoder import BackdoorTarget, select_references
from .config import ProbeConfig, TargetConfig
from .data import load_split
from .encoder import Encoder
from .probe import probe_encoder


def build_targets(configs: list[TargetConfig], input_shape: tuple[int, int, int], *, root: str | None,
                  seed: int = 0, with_references: bool = True) -> list[BackdoorTarget]:
    """Backdoor targets from their configs: the trigger at the encoder's input shape and, if asked,
    ``references`` images of the target class from the downstream train split (converted).

    Raises:
        KDGuardError: unknown dataset/trigger/parameter, a class outside the dataset.
    """
    targets = []
    for i, tc in enumerate(configs):
        trigger = build_trigger(tc.trigger, tuple(input_shape), seed=tc.trigger_seed, **dict(tc.trigger_params))
        refs = None
        if with_references:
            ds = load_split(tc.dataset, "train", tc.root or root, input_shape)
            refs = select_references(ds, tc.target, tc.references, seed=seed + i)
            name = ds.name
        else:
            name = tc.dataset
        targets.append(BackdoorTarget(name, int(tc.target), trigger, refs))
    return targets



Downstream = dict[str, tuple[ImageDataset, ImageDataset]]


def load_downstream(names: list[str], root: str | None, input_shape: tuple[int, int, int]) -> Downstream:
    """Train and test splits of each downstream dataset, converted to the encoder's input shape.

    Raises:
        KDGuardError: no dataset named, or a dataset that cannot be loaded.
    """
    if not names:
        raise KDGuardError("no downstream dataset given", "set datasets=[cifar10,gtsrb]")
    return {name: (load_split(name, "train", root, input_shape), load_split(name, "test", root, input_shape))
            for name in names}


def target_map(targets: list[BackdoorTarget]) -> dict[str, BackdoorTarget]:
    """Dataset name → its (first) backdoor target; names compare case-insensitively."""
    out: dict[str, BackdoorTarget] = {}
    for t in targets:
        out.setdefault(t.dataset.lower(), t)
    return out


def evaluate_downstream(encoder: Encoder, downstream: Downstream, targets: list[BackdoorTarget],
                        cfg: ProbeConfig, *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Probe ``encoder`` on every downstream dataset: ``{name: ProbeResult dict}``.

    Datasets with a backdoor target get ASR/ASR-all; the others CA only.
    """
    by_name = target_map(targets)
    results = {}
    for name, (train, test) in downstream.items():
        target = by_name.get(train.name.lower()) or by_name.get(name.lower())
        results[name] = probe_encoder(encoder, train, test, target=target, cfg=cfg, seed=seed).to_dict()
    return results


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Means over datasets: ``mean_ca`` (all), ``mean_asr`` and ``mean_asr_all`` (attacked ones)."""
    cas = [r["ca"] for r in results.values()]
    asrs = [r["asr"] for r in results.values() if r.get("asr") is not None]
    alls = [r["asr_all"] for r in results.values() if r.get("asr_all") is not None]
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"mean_ca": mean(cas), "mean_asr": mean(asrs), "mean_asr_all": mean(alls)}


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def probe_table(rows: list[tuple[str, dict[str, dict[str, Any]]]], datasets: list[str]) -> str:
    """Markdown table: one row per encoder, ``CA / ASR / ASR-all`` (%) per dataset and the means."""
    head = "| encoder | " + " | ".join(f"{d} CA / ASR / ASR-all %" for d in datasets) + \
        " | mean CA % | mean ASR % |"
    lines = [head, "|---" * (len(datasets) + 3) + "|"]
    for label, results in rows:
        cells = []
        for d in datasets:
            r = results.get(d)
            cells.append("—" if r is None else f"{_pct(r['ca'])} / {_pct(r.get('asr'))} / {_pct(r.get('asr_all'))}")
        s = summarize(results)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(s['mean_ca'])} | {_pct(s['mean_asr'])} |")
    return "\n".join(lines)
