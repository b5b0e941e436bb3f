"""Atomic file writes: a crash mid-write never leaves a truncated checkpoint, report, cache entry
or download. Every file kdguard writes goes through :func:`atomic_write`."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None], *, mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    ``os.replace`` is atomic on POSIX within one filesystem, so readers see either the old file
    or the complete new one. The temporary file is fsync'ed before the rename and the directory
    after it, so a power loss cannot leave the new name pointing at unwritten data. The file gets
    the mode an ordinary new file would (``0o666`` less the umask: 0644 under the usual 022), not
    the 0600 of :func:`tempfile.mkstemp`; ``mode`` overrides it (the dataset cache uses 0o644, as
    several users may share it). A killed process can leave a ``.<name>.*.tmp`` behind;
    :func:`kdguard.rundir.open_run` removes those of a run directory. An exception raised by
    ``write`` (a failed download check, a full disk) removes the temporary file and propagates;
    the old file at ``path``, if any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync(path: str | Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:  # filesystems without fsync (some network mounts) still get the rename
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_text(text), mode=mode)


def write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), mode=mode)


def write_npy(path: str | Path, array: Any, *, mode: int | None = None) -> Path:
    """Write one numpy array in ``.npy`` format (no pickling) atomically."""
    import numpy as np

    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.save would append ".npy" to a bare path
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write, mode=mode)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line (appends of one short line are effectively atomic)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
