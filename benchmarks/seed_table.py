"""Shared by the benchmarks that repeat variants over seeds: variant selection and the table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from statistics import mean


def selected(variants: dict[str, list[str]], only: Sequence[str] | None) -> Iterator[tuple[int, str, list[str]]]:
    """(index, name, overrides) of the variants whose name contains one of ``only`` (all if None);
    the index is the variant's position in ``variants``, so cache directories stay stable."""
    for i, (name, extra) in enumerate(variants.items()):
        if not only or any(k in name for k in only):
            yield i, name, extra


def seed_table(rows: Sequence[tuple[str, str, Sequence[dict]]], first: str,
               extra_cols: Sequence[tuple[str, Sequence[float]]] = (), per: str = "seed") -> str:
    """A Markdown table: one row per variant with last-round CA / ASR % per seed and their means.

    Args:
        rows: (variant name, overrides as text, one metrics dict per seed with ``ca``/``asr``
            fractions).
        first: header of the first column.
        extra_cols: (header, one value per row) columns appended at the right, printed as is.
        per: what the metrics dicts of a row stand for, in the headers ("seed", or "run").
    """
    head = f"| {first} | overrides | CA / ASR % per {per} | mean CA % | mean ASR % |"
    head += "".join(f" {h} |" for h, _ in extra_cols)
    lines = [head, "|---" * (5 + len(extra_cols)) + "|"]
    for r, (name, extra, per_seed) in enumerate(rows):
        cells = " · ".join(f"{100 * m['ca']:.1f} / {100 * m['asr']:.1f}" for m in per_seed)
        line = (f"| {name} | `{extra}` | {cells} | {100 * mean(m['ca'] for m in per_seed):.1f} "
                f"| {100 * mean(m['asr'] for m in per_seed):.1f} |")
        lines.append(line + "".join(f" {vals[r]:.0f} |" for _, vals in extra_cols))
    return "\n".join(lines)
