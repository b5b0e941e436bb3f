"""Tables and the HTML page of a suite, from its ledger records.

Per cell: mean ± std (sample standard deviation, n − 1) over the seeds recorded and n, for CA,
ASR and, beside every ASR, the no-trigger rate (``asr_no_trigger``: the share of non-target test
images the model sends to the target class without the trigger, :mod:`kdguard.metrics`), then
the worst seed (highest ASR). The HTML page adds a CA-vs-ASR scatter per group (the suite's
``group_by`` axis, else its method) and each cell's curves (validation CA/ASR per epoch, or test
CA/ASR per evaluated data-free round), as PNG images embedded in the page: it reads offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the line before the records converted from an earlier ledger (``converted`` in the record)
CONVERTED_NOTE = ("Converted from an earlier ledger (no method-stage fingerprint or curve; stage minutes are the "
                  "method stage's training minutes, teacher and evaluations excluded)")
#: the metrics of the tables, (key, label), in % (the no-trigger rate follows ASR)
#: and then the clean accuracy on the target class's own images: a student that never predicts
#: the target class scores ASR 0 without having unlearned anything
COLUMNS = (("ca", "CA %"), ("asr", "ASR %"), ("asr_no_trigger", "no-trigger %"), ("target_ca", "target-class CA %"))


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None below 2 values, n) of the non-None ``values``."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return mean, std, len(xs)


def fmt_mean_std(values: Sequence[float]) -> str:
    """``"91.2 ± 0.8 (3)"`` in %, ``"91.2 (1)"`` for one value, ``"—"`` for none."""
    mean, std, n = mean_std(values)
    if mean is None:
        return "—"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "") + f" ({n})"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def by_cell(records: list[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by cell (``order`` first, then the rest sorted), each sorted by seed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["cell"], []).append(r)
    names = [c for c in order if c in groups] + sorted(set(groups) - set(order))
    return {c: sorted(groups[c], key=lambda r: r["seed"]) for c in names}


def worst_seed(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record with the highest ASR (None when no record has an ASR)."""
    with_asr = [r for r in records if r["metrics"].get("asr") is not None]
    return max(with_asr, key=lambda r: (r["metrics"]["asr"], -r["seed"])) if with_asr else None


def summary_rows(records: list[dict[str, Any]], order: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per cell: ``cell``, ``n``, ``seeds``, per :data:`COLUMNS` key its (mean, std, n),
    ``worst`` (the worst seed's record or None), ``wall_minutes`` (mean)."""
    rows = []
    for cell, recs in by_cell(records, order).items():
        row: dict[str, Any] = {"cell": cell, "n": len(recs), "seeds": [r["seed"] for r in recs]}
        for key, _ in COLUMNS:
            row[key] = mean_std([r["metrics"].get(key) for r in recs])
        row["worst"] = worst_seed(recs)
        walls = [r.get("wall_seconds") for r in recs if r.get("wall_seconds") is not None]
        row["wall_minutes"] = sum(walls) / len(walls) / 60 if walls else None
        rows.append(row)
    return rows


def seeds_sentence(ledger: str | Path, suite: str, cells: dict[str, str], scale: str = "cpu") -> str:
    """One paragraph on ``cells`` (cell → label) of ``suite`` over the seeds the ledger holds:
    per cell mean ± std (n) of CA, ASR, the no-trigger rate and (where recorded) the target-class
    CA, and the worst seed; or, without records, the command that makes them. Numbers come from the records, read as data."""
    from .ledger import read_records

    records, _ = read_records(ledger, suite, scale) if Path(ledger).is_dir() else ([], [])
    groups = by_cell([r for r in records if r["cell"] in cells], list(cells))
    command = f"kdguard suite run {suite} --only {','.join(cells)} --seeds 0,1,2,3,4"
    if not groups:
        return f"No seeds of this setting are recorded in {ledger}/{suite}; `{command}` records them."
    parts = []
    for cell, recs in groups.items():
        stat = {key: fmt_mean_std([r["metrics"].get(key) for r in recs]) for key, _ in COLUMNS}
        worst = worst_seed(recs)
        worst_text = "" if worst is None else (f"; worst seed {worst['seed']}: CA {_pct(worst['metrics'].get('ca'))} %, "
                                               f"ASR {_pct(worst['metrics'].get('asr'))} %")
        target = (f", target-class CA {stat['target_ca']} %"
                  if any(r["metrics"].get("target_ca") is not None for r in recs) else "")
        parts.append(f"{cells[cell]}: CA {stat['ca']} %, ASR {stat['asr']} % (no-trigger {stat['asr_no_trigger']} %)"
                     + target + worst_text)
    seeds = sorted({r["seed"] for recs in groups.values() for r in recs})
    return (f"Over seeds {', '.join(map(str, seeds))} of this setting ({ledger}/{suite}, mean ± std (n), recorded by "
            f"`{command}`): " + "; ".join(parts) + ".")


def markdown_tables(records: list[dict[str, Any]], order: Sequence[str] = ()) -> str:
    """The summary table (mean ± std (n), worst seed) and the per-seed table, as Markdown."""
    lines = ["| cell | seeds | " + " | ".join(label for _, label in COLUMNS)
             + " | worst seed: ASR % (no-trigger %), CA % | stage minutes (mean) |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
    grouped = by_cell(records, order)
    for row in summary_rows(records, order):
        recs = grouped[row["cell"]]
        cols = [fmt_mean_std([r["metrics"].get(key) for r in recs]) for key, _ in COLUMNS]
        w = row["worst"]
        worst = "—" if w is None else (f"s{w['seed']}: {_pct(w['metrics'].get('asr'))} "
                                       f"({_pct(w['metrics'].get('asr_no_trigger'))}), "
                                       f"{_pct(w['metrics'].get('ca'))}")
        minutes = "—" if row["wall_minutes"] is None else f"{row['wall_minutes']:.1f}"
        lines.append(f"| {row['cell']} | {','.join(map(str, row['seeds']))} | " + " | ".join(cols)
                     + f" | {worst} | {minutes} |")
    lines += ["", "| cell | seed | CA % | ASR % | no-trigger % | target-class CA % | teacher CA % | teacher ASR % | "
                  "teacher sha256 | stage minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cell, recs in grouped.items():
        for r in recs:
            m, t = r["metrics"], r.get("teacher") or {}
            wall = r.get("wall_seconds")
            lines.append(f"| {cell} | {r['seed']} | {_pct(m.get('ca'))} | {_pct(m.get('asr'))} | "
                         f"{_pct(m.get('asr_no_trigger'))} | {_pct(m.get('target_ca'))} | {_pct(t.get('ca'))} | "
                         f"{_pct(t.get('asr'))} | "
                         f"{str(t.get('sha256') or '—')[:12]} | {'—' if wall is None else f'{wall / 60:.1f}'} |")
    return "\n".join(lines)


def markdown_report(suite: str, description: str, scale: str, records: list[dict[str, Any]],
                    refused: list[str], order: Sequence[str] = (), missing: Sequence[str] = ()) -> str:
    """The whole Markdown report of a suite."""
    parts = [f"# Suite {suite} ({scale} scale)", ""]
    if description:
        parts += [description, ""]
    if not records:
        parts += ["No finished cells recorded yet.", ""]
    else:
        parts += ["Mean ± sample std (n seeds) of the last-epoch (last-round) test metrics, in %; the no-trigger "
                  "rate is the share of non-target test images sent to the target without the trigger; "
                  "target-class CA the clean accuracy on the target class's own images. The worst seed "
                  "is the one with the highest ASR.", "", markdown_tables(records, order), ""]
        machines = sorted({f"{r.get('machine')} ({r.get('device')}, {r.get('threads')} threads)" for r in records})
        parts += [f"Ran on: {'; '.join(machines)}.", ""]
    converted = sorted({f"{r['cell']} s{r['seed']}" for r in records if r.get("converted")})
    if converted:
        parts += [f"{CONVERTED_NOTE}: {', '.join(converted)}.", ""]
    if missing:
        parts += [f"Not recorded yet: {', '.join(missing)}.", ""]
    if refused:
        parts += ["Refused records:", "", *[f"- {r}" for r in refused], ""]
    return "\n".join(parts)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def scatter_images(records: list[dict[str, Any]], group_by: str | None) -> dict[str, str]:
    """Group → embedded PNG of CA (x) against ASR (y), one colour per cell, small dots per seed and
    a large mark at the cell's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        key = r["axes"].get(group_by) if group_by else r["method"]
        groups.setdefault(str(key), []).append(r)
    out = {}
    for group, recs in groups.items():
        fig, ax = plt.subplots(figsize=(5, 4))
        for i, (cell, cell_recs) in enumerate(by_cell(recs).items()):
            pts = [(r["metrics"].get("ca"), r["metrics"].get("asr")) for r in cell_recs]
            pts = [(100 * c, 100 * a) for c, a in pts if c is not None and a is not None]
            if not pts:
                continue
            colour = f"C{i % 10}"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=colour, alpha=0.6)
            ax.scatter([sum(p[0] for p in pts) / len(pts)], [sum(p[1] for p in pts) / len(pts)], s=70,
                       color=colour, marker="D", label=cell)
        ax.set_xlabel("CA %")
        ax.set_ylabel("ASR %")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{group_by or 'method'} = {group}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        out[group] = _png(fig)
    return out


def curve_images(records: list[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, str]:
    """Cell → embedded PNG of its CA (solid) and ASR (dashed) curves, one colour per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    for cell, recs in by_cell(records, order).items():
        if not any(r.get("curve") for r in recs):
            continue
        fig, ax = plt.subplots(figsize=(5, 3))
        for i, r in enumerate(recs):
            curve = r.get("curve") or []
            xs = [p[0] for p in curve]
            colour = f"C{i % 10}"
            ax.plot(xs, [None if p[1] is None else 100 * p[1] for p in curve], color=colour, label=f"CA s{r['seed']}")
            ax.plot(xs, [None if p[2] is None else 100 * p[2] for p in curve], color=colour, ls="--",
                    label=f"ASR s{r['seed']}")
        ax.set_xlabel("epoch / round")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.set_title(cell)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        out[cell] = _png(fig)
    return out


def _md_table_to_html(md: str) -> str:
    """The pipe tables of :func:`markdown_tables` as HTML tables (text escaped)."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, body = rows[0], rows[2:]
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                       + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            flush()
    flush()
    return "\n".join(out)


def html_report(suite: str, description: str, scale: str, records: list[dict[str, Any]], refused: list[str],
                order: Sequence[str] = (), group_by: str | None = None, missing: Sequence[str] = ()) -> str:
    """One self-contained HTML page: the tables, a CA-vs-ASR scatter per group, each cell's curves."""
    esc = html.escape
    body = [f"<h1>Suite {esc(suite)} ({esc(scale)} scale)</h1>"]
    if description:
        body.append(f"<p>{esc(description)}</p>")
    if records:
        body += ["<h2>Cells</h2>", "<p>Mean ± sample std (n seeds), in %; no-trigger: non-target test images sent "
                 "to the target without the trigger; target-class CA: clean accuracy on the target class's "
                 "own images; worst seed: highest ASR.</p>",
                 _md_table_to_html(markdown_tables(records, order))]
        body.append(f"<h2>CA against ASR per {esc(group_by or 'method')}</h2><div class='grid'>")
        body += [f"<figure><img alt='scatter {esc(g)}' src='{src}'></figure>"
                 for g, src in scatter_images(records, group_by).items()]
        body.append("</div><h2>Curves</h2><div class='grid'>")
        body += [f"<figure><img alt='curves {esc(c)}' src='{src}'></figure>"
                 for c, src in curve_images(records, order).items()]
        body.append("</div>")
    else:
        body.append("<p>No finished cells recorded yet.</p>")
    converted = sorted({f"{r['cell']} s{r['seed']}" for r in records if r.get("converted")})
    if converted:
        body.append(f"<p>{esc(CONVERTED_NOTE)}: {esc(', '.join(converted))}.</p>")
    if missing:
        body.append(f"<p>Not recorded yet: {esc(', '.join(missing))}.</p>")
    if refused:
        body.append("<h2>Refused records</h2><ul>" + "".join(f"<li>{esc(r)}</li>" for r in refused) + "</ul>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:8px}"
             "figure{margin:0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>kdguard suite {esc(suite)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
