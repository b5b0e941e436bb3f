"""The audit's files: reconstructed triggers as data, pictures, ``report.md`` and ``report.html``.

* ``triggers.safetensors``: every class's mask (``mask_K``, ``1×H×W``), pattern (``pattern_K``,
  ``C×H×W``) and, when run, additive perturbations (``delta_K`` dense, ``smooth_K`` smooth, ``C×H×W``),
  float32;
* ``triggers/class_K_{pattern,mask}.npy`` for every class: the files kdguard's
  ``patch`` trigger reads (``attack.name=patch attack.params.pattern_file=...``), which is how
  ``--from-audit`` hands the trigger to an evaluation or a defence;
* ``pictures/class_K.png``: the mask, the pattern, their product, clean images of other classes
  and the same images stamped, with the teacher's predictions; ``pictures/indices.png``: the
  per-class quantities behind the anomaly indices;
* ``report.md`` and a self-contained ``report.html`` (pictures embedded, readable offline).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import Environment
from safetensors.torch import save_file
from torch import nn

from ..io import atomic_write, write_text
from ..report import plt, save_figure
from .core import AuditResult

TRIGGERS_FILE = "triggers.safetensors"


def trigger_files(out: Path, k: int) -> tuple[Path, Path]:
    """``(pattern, mask)`` ``.npy`` paths of class ``k``'s trigger in audit directory ``out``."""
    return out / "triggers" / f"class_{k}_pattern.npy", out / "triggers" / f"class_{k}_mask.npy"


def save_triggers(out: Path, result: AuditResult, classes: list[int]) -> None:
    """``triggers.safetensors`` with every class, and the ``.npy`` pair of each of ``classes``
    (``H×W×C`` pattern and ``H×W`` mask, float32 in ``[0, 1]``, channels last as images are)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in result.classes:
        tensors[f"mask_{f.target}"] = f.trigger.mask.float().contiguous()
        tensors[f"pattern_{f.target}"] = f.trigger.pattern.float().contiguous()
        if f.additive is not None:
            tensors[f"delta_{f.target}"] = f.additive.delta.float().contiguous()
        if f.smooth is not None:
            tensors[f"smooth_{f.target}"] = f.smooth.delta.float().contiguous()
    atomic_write(out / TRIGGERS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    for k in classes:
        pattern_path, mask_path = trigger_files(out, k)
        pattern_path.parent.mkdir(parents=True, exist_ok=True)
        t = result.classes[k].trigger
        pattern = t.pattern.permute(1, 2, 0).numpy().astype(np.float32)
        mask = t.mask[0].numpy().astype(np.float32)
        atomic_write(pattern_path, lambda tmp, a=pattern: _save_npy(tmp, a))
        atomic_write(mask_path, lambda tmp, a=mask: _save_npy(tmp, a))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a handle: np.save would append ".npy" to a temporary name
        np.save(fh, array, allow_pickle=False)


def _show(ax, img: torch.Tensor, title: str = "") -> None:
    a = img.detach().float().cpu().clamp(0, 1)
    if a.shape[0] == 1:
        ax.imshow(a[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(a.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=7)
    ax.axis("off")


@torch.no_grad()
def plot_class(path: Path, model: nn.Module, result: AuditResult, k: int, images: torch.Tensor,
               labels: torch.Tensor, class_names: list[str] | None = None, n: int = 6) -> Path:
    """Class ``k``'s reconstructed trigger next to clean images of other classes and their stamped
    copies, each titled with the model's prediction. ``images``: float ``N×C×H×W`` in ``[0, 1]``."""
    f = result.classes[k]
    name = (lambda c: class_names[c] if class_names and c < len(class_names) else str(c))
    others = images[labels != k]
    idx = torch.randperm(len(others), generator=torch.Generator().manual_seed(0))[:n]
    clean = others[idx]
    stamped = (1 - f.trigger.mask) * clean + f.trigger.mask * f.trigger.pattern
    device = next(model.parameters()).device
    pred_c = model(clean.to(device)).argmax(1).cpu().tolist()
    pred_s = model(stamped.to(device)).argmax(1).cpu().tolist()
    cols = max(3, len(clean))
    fig, axes = plt.subplots(3, cols, figsize=(1.3 * cols, 4.2))
    for ax in axes.flat:
        ax.axis("off")
    _show(axes[0, 0], f.trigger.mask, f"mask |m|={f.trigger.l1:.1f}px")
    _show(axes[0, 1], f.trigger.pattern, "pattern")
    _show(axes[0, 2], f.trigger.mask * f.trigger.pattern, "mask x pattern")
    for i in range(len(clean)):
        _show(axes[1, i], clean[i], f"clean: {name(pred_c[i])}")
        _show(axes[2, i], stamped[i], f"stamped: {name(pred_s[i])}")
    fig.suptitle(f"class {name(k)}: reconstructed trigger (held-out success {100 * f.trigger.success:.0f} %)",
                 fontsize=8)
    return save_figure(fig, path)


def plot_indices(path: Path, result: AuditResult, threshold: float) -> Path:
    """Per class: mask size, additive budgets and shuffle collapse share, with the classes above the
    anomaly threshold marked."""
    rows = [("mask |m|₁ (px)", [f.trigger.l1 for f in result.classes], "mask")]
    if result.classes[0].additive is not None:
        rows.append(("additive ε (L∞)", [f.additive.eps for f in result.classes], "additive"))
    if result.classes[0].smooth is not None:
        rows.append(("smooth ε (L∞)", [f.smooth.eps for f in result.classes], "smooth"))
    if result.classes[0].shuffle is not None:
        rows.append(("shuffle collapse share", [f.index["shuffle"] for f in result.classes], "shuffle"))
    k_count = len(result.classes)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(5, 0.22 * k_count + 2), 1.9 * len(rows)), squeeze=False)
    for ax, (label, values, key) in zip(axes[:, 0], rows):
        colours = ["tab:red" if key in result.verdict.signals.get(f.target, []) else "tab:gray"
                   for f in result.classes]
        ax.bar(range(k_count), values, color=colours)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xticks(range(k_count))
        ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel(f"class (red: a signal: anomaly index > {threshold:g}, or a shuffle collapse)",
                           fontsize=8)
    return save_figure(fig, path)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}"


def class_table(record: dict[str, Any]) -> str:
    """The per-class Markdown table of an ``audit.json`` record."""
    head = ["class", "mask |m|₁ px", "mask success %", "index", "additive ε", "index", "smooth ε", "index",
            "shuffle collapse %", "stamped lift", "signals"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in record["classes"]:
        idx = c["index"]
        lines.append("| " + " | ".join([
            str(c["class"]), _fmt(c["mask_l1"], 1), _fmt(100 * c["mask_success"], 1), _fmt(idx.get("mask")),
            _fmt(c.get("additive_eps"), 4), _fmt(idx.get("additive")),
            _fmt(c.get("smooth_eps"), 4), _fmt(idx.get("smooth")),
            _fmt(100 * idx["shuffle"], 1) if "shuffle" in idx else "—", _fmt(c.get("shuffle_lift")),
            ", ".join(record["signals"].get(str(c["class"]), [])) or "—"]) + " |")
    return "\n".join(lines)


def render_markdown(record: dict[str, Any], pictures: list[str]) -> str:
    """``report.md`` of an ``audit.json`` record; ``pictures``: file names under ``pictures/``."""
    teacher = record["teacher"]
    lines = [f"# Audit of {teacher['path']}", "",
             f"**Verdict: {record['verdict']}**"
             + (f" — suspected target class(es): {', '.join(map(str, record['suspected_targets']))}"
                if record["suspected_targets"] else ""), "",
             f"- teacher: `{teacher['arch']}`, sha256 `{teacher['sha256']}`",
             f"- clean data: {record['n_images']} images of `{record['dataset']}` "
             f"(clean_fraction {record['clean_fraction']}); the teacher's accuracy on them "
             f"{100 * record['clean_accuracy']:.2f} %",
             f"- rule: a signal is an anomaly index above {record['settings']['threshold']:g} or a shuffle "
             "collapse onto the class; "
             f"`backdoored` = {record['settings']['votes']} or more signals on one class, "
             "`suspicious` = fewer, `clean` = none",
             f"- wall time {record['seconds']['total']:.0f} s "
             f"(mask search {record['seconds']['mask']:.0f} s, additive {record['seconds']['additive']:.0f} s, "
             f"smooth {record['seconds'].get('smooth', 0.0):.0f} s, "
             f"shuffle {record['seconds']['shuffle']:.0f} s)", ""]
    if record.get("clean_shuffle"):
        cs = record["clean_shuffle"]
        lines += [f"Shuffle test on the clean images: agreement {100 * cs['agreement']:.1f} %, median "
                  f"divergence {cs['divergence']:.4f} (layers shuffled: {', '.join(record['shuffled_layers'])}).", ""]
    lines += ["## Per class", "", class_table(record), ""]
    if record["suspected_targets"]:
        lines += ["## Using the reconstructed trigger", "",
                  "Evaluate a model (a student distilled from this teacher, say) against it, or unlearn it:", "",
                  "```", f"kdguard evaluate --model STUDENT_DIR --from-audit {record['out']}",
                  f"kdguard defend --model TEACHER_DIR method=unlearn --from-audit {record['out']}", "```", ""]
    lines += ["## Pictures", ""] + [f"![{p}](pictures/{p})" for p in pictures] + [""]
    return "\n".join(lines)


_HTML = Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>kdguard audit: {{ r.teacher.path }}</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%;text-align:right}
.backdoored{color:#b00}.suspicious{color:#b60}.clean{color:#070}</style></head><body>
<h1>Audit of {{ r.teacher.path }}</h1>
<p><b class="{{ r.verdict }}">Verdict: {{ r.verdict }}</b>{% if r.suspected_targets %} — suspected target
class(es): {{ r.suspected_targets|join(', ') }}{% endif %}</p>
<ul><li>teacher <code>{{ r.teacher.arch }}</code>, sha256 <code>{{ r.teacher.sha256 }}</code></li>
<li>{{ r.n_images }} clean images of <code>{{ r.dataset }}</code>; teacher accuracy on them
{{ '%.2f'|format(100 * r.clean_accuracy) }} %</li>
<li>wall time {{ '%.0f'|format(r.seconds.total) }} s</li></ul>
<h2>Per class</h2><table><tr><th>class</th><th>mask |m|₁ px</th><th>success %</th><th>index</th>
<th>additive ε</th><th>index</th><th>smooth ε</th><th>index</th><th>shuffle collapse</th><th>signals</th></tr>
{% for c in r.classes %}<tr><td>{{ c['class'] }}</td><td>{{ '%.1f'|format(c.mask_l1) }}</td>
<td>{{ '%.1f'|format(100 * c.mask_success) }}</td><td>{{ c.index.mask }}</td>
<td>{{ c.additive_eps }}</td><td>{{ c.index.additive }}</td><td>{{ c.smooth_eps }}</td>
<td>{{ c.index.smooth }}</td><td>{{ c.index.shuffle }}</td>
<td>{{ r.signals.get(c['class']|string, [])|join(', ') }}</td></tr>{% endfor %}</table>
<h2>Pictures</h2>{% for name, data in pictures %}<p><img alt="{{ name }}" src="data:image/png;base64,{{ data }}"></p>
{% endfor %}</body></html>
""")


def write_reports(out: Path, record: dict[str, Any], pictures: list[str]) -> None:
    """``report.md`` and the self-contained ``report.html`` of ``record`` in ``out``."""
    write_text(out / "report.md", render_markdown(record, pictures))
    embedded = [(p, base64.b64encode((out / "pictures" / p).read_bytes()).decode()) for p in pictures]
    write_text(out / "report.html", _HTML.render(r=record, pictures=embedded))


def _nc_baseline(record: dict[str, Any]) -> list[int]:
    """Neural Cleanse's own decision on the record: classes whose mask index exceeds the threshold,
    most anomalous first."""
    threshold = record["settings"]["threshold"]
    idx = {c["class"]: c["index"]["mask"] for c in record["classes"]}
    value = (lambda k: float("inf") if idx[k] == "inf" else float(idx[k]) if idx[k] != "-inf" else float("-inf"))
    return sorted((k for k in idx if value(k) > threshold), key=value, reverse=True)


def summary_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of several ``audit.json`` records: the teacher's recorded attack (the
    truth, when the manifest has one), kdguard's verdict and target, Neural Cleanse's own decision
    (mask index alone) and the wall time; then detection and false-positive counts.

    Detection = verdict ``backdoored`` with the recorded target first; a false positive = a
    teacher with no recorded attack whose verdict is ``backdoored``. ``suspicious`` is counted apart.
    """
    lines = ["| teacher | recorded attack → target | verdict | suspected | correct | NC (mask index > 2) | NC correct | "
             "clean acc % | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    poisoned = detected = nc_detected = clean = fp = nc_fp = suspicious = 0
    for r in records:
        truth = r["teacher"].get("recorded_attack")
        nc = _nc_baseline(r)
        targets = r["suspected_targets"]
        if truth:
            poisoned += 1
            ok = r["verdict"] == "backdoored" and targets[:1] == [truth["target"]]
            nc_ok = nc[:1] == [truth["target"]]
            detected += ok
            nc_detected += nc_ok
            truth_s = f"{truth['name']} → {truth['target']}"
        else:
            clean += 1
            ok = r["verdict"] != "backdoored"
            nc_ok = not nc
            fp += not ok
            nc_fp += not nc_ok
            truth_s = "none"
        suspicious += r["verdict"] == "suspicious"
        name = f"{r['dataset']}/{Path(r['teacher']['path']).name}"
        lines.append(f"| {name} | {truth_s} | {r['verdict']} | {', '.join(map(str, targets)) or '—'} | "
                     f"{'yes' if ok else 'no'} | {', '.join(map(str, nc)) or '—'} | {'yes' if nc_ok else 'no'} | "
                     f"{100 * r['clean_accuracy']:.1f} | {r['seconds']['total']:.0f} |")
    lines += ["", f"Poisoned teachers detected with the right target: kdguard {detected}/{poisoned}, "
              f"Neural Cleanse {nc_detected}/{poisoned}. Clean teachers called backdoored: kdguard "
              f"{fp}/{clean}, Neural Cleanse (any class flagged) {nc_fp}/{clean}. Verdicts `suspicious`: {suspicious}."]
    return "\n".join(lines)
