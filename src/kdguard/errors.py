"""User-facing errors.

Every problem caused by the user's input (an unknown name, a missing file, a value out of range)
is raised as :class:`KDGuardError`. Its message is one line that names the offending value and
the fix. The CLI prints it as ``error: <message>`` and exits with code 2; the Python API lets it
propagate (it subclasses :class:`ValueError`, so ``except ValueError`` also catches it).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KDGuardError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}; {fix}")


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> KDGuardError:
    """Build the error for an unknown registry name, suggesting the closest valid names."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return KDGuardError(
        f"unknown {kind} {name!r}",
        f"{hint}choose one of: {', '.join(choices)} (see `kdguard list`)",
    )


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """Raise :class:`KDGuardError` unless ``value`` lies in the interval; returns ``value``.

    ``low_open``/``high_open`` make the bound exclusive, e.g. ``check_range("poison rate", r, 0, 1,
    low_open=True)`` checks ``0 < r <= 1``.
    """
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise KDGuardError(f"{name} {value!r} is outside {lb}{low}, {high}{hb}",
                           f"give a value in {lb}{low}, {high}{hb}")
    return value


def check_choice(label: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`KDGuardError` unless the setting ``label`` holds one of ``choices``; a YAML
    boolean read from an unquoted on/off gets the quoting fix."""
    if value not in choices:
        fix = f"set {label} to one of: {', '.join(choices)}"
        if value in ("True", "False") and {"on", "off"} & set(choices):
            # a YAML file's unquoted on/off/yes/no is read as a boolean (YAML 1.1)
            word = "on" if value == "True" and "on" in choices else "off"  # a valid word to quote
            fix += f"; in a YAML file quote it ({label.rsplit('.', 1)[-1]}: '{word}')"
        raise KDGuardError(f"{label} {value!r} is not one of {', '.join(choices)}", fix)


def check_positive(label: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    """Raise :class:`KDGuardError` unless the setting ``label`` is > 0 (``>= 0`` with ``allow_zero``);
    ``None`` passes (an unset optional setting)."""
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise KDGuardError(f"{label} {value!r} must be {bound}", f"give {label} {bound}")
