"""The trust boundary: what kdguard takes from files, and what only from the user.

A teacher is untrusted. Its files (``model.safetensors``, ``manifest.json``, a ``config.yaml``, an
SSL spec, a results record) are read as data only:

* weights are tensors (safetensors, or ``torch.load(weights_only=True)``), never unpickled objects;
* an architecture or trigger read from a file may only be a registry name (or the ``wrn-D-K``
  form); an import path ``package.module:attr`` is honoured only when the user passes it on the
  command line or in a Python call, because importing a module runs its code;
* config files and ``key=value`` overrides may not use OmegaConf interpolations (``${...}``),
  which can read environment variables and call resolvers.

This module holds the checks; the loaders (:mod:`kdguard.checkpoint`, :mod:`kdguard.config`,
:mod:`kdguard.ssl.encoder`, :mod:`kdguard.attacks`) call them at the point where file contents
would otherwise reach code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from .errors import KDGuardError

# ``pkg.mod:attr`` with identifier-like parts; "cuda:0", "C:/data" and URLs do not match.
_IMPORT_PATH = re.compile(r"^\s*[A-Za-z_][\w.]*\s*:\s*[A-Za-z_][\w.]*\s*$")


def is_import_path(value: object) -> bool:
    """Whether ``value`` is a string of the form ``package.module:attr`` (an import path)."""
    return isinstance(value, str) and bool(_IMPORT_PATH.match(value))


def names_code(value: object) -> bool:
    """Whether a model or trigger *name* would make kdguard import code: any name holding ``:``.

    Stricter than :func:`is_import_path`, because :func:`kdguard.models.build_model` treats every
    name with a colon as an import path.
    """
    return isinstance(value, str) and ":" in value


def refuse_code_from_file(value: object, *, what: str, source: str, fix: str) -> None:
    """Raise :class:`KDGuardError` when ``value`` (read from the file ``source``) names code.

    Args:
        value: the name read from the file (e.g. a manifest's ``model.arch``).
        what: what the name is, e.g. ``"architecture"`` or ``"trigger function"``.
        source: the file, for the message.
        fix: the command-line way to pass the same name, e.g. ``"pass --teacher-arch pkg.mod:Net"``.

    Raises:
        KDGuardError: ``value`` holds a colon (an import path).
    """
    if names_code(value):
        raise KDGuardError(
            f"{source} names the {what} {value!r}, an import path; kdguard never imports code "
            "named by a file", f"{fix} if you trust that code")


def _walk(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _walk(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def import_paths_in(tree: Any) -> list[tuple[str, str]]:
    """``(dotted key, value)`` of every string leaf of a nested dict/list that is an import path."""
    return [(key, value) for key, value in _walk(tree) if is_import_path(value)]


def interpolations_in(tree: Any) -> list[tuple[str, str]]:
    """``(dotted key, value)`` of every string leaf holding an OmegaConf interpolation ``${``."""
    return [(key, value) for key, value in _walk(tree) if isinstance(value, str) and "${" in value]
