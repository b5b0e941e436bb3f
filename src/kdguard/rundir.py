"""Run directories that cannot lie about what they hold.

Every job writes one run directory (``out=``). :func:`open_run` (behind
:meth:`kdguard.runs.RunContext.open`, so every job gets it) makes sure that the files there were
made by the job being run, and that no other process writes there at the same time:

``run.json``
    the run's identity: ``fingerprint`` (sha256 of the job's kind (:func:`job_kind`), its
    resolved config without :data:`IGNORED_KEYS`, the sha256 of every parent weights file and
    the kdguard version), the ``config`` and ``parents`` it was computed from, ``created``, and
    ``extensions`` (each ``--resume`` that lengthened training: key, from, to, time).
``.kdguard.lock``
    a ``filelock`` lock, taken without waiting while the job runs.

Rules, in the order they are checked:

* ``out`` is refused with one line when it lies under a regular file, in a pseudo-filesystem
  (``/proc``, ``/sys``, ``/dev``) or where directories cannot be created; ``~`` is expanded.
* another process holding the lock → error naming the directory.
* ``--overwrite`` (:func:`run_policy`) removes everything in the directory first (never ``/``,
  the home directory, or the working directory or one of its parents).
* an empty directory, or one holding only kdguard's bookkeeping (``run.json``, ``config.yaml``:
  a run that stopped before computing anything), starts a new run.
* the same fingerprint → the run continues (an interrupted run re-run with the same command
  resumes from its ``train_state.pt`` / ``datafree_state.pt`` bit-identically).
* another fingerprint → :class:`~kdguard.errors.KDGuardError` naming the differing keys
  (``attack.name: badnets -> blend``, ``teacher weights: sha256 … -> …``), unless ``--resume``
  is given and the only difference is a longer training (:data:`EXTENDABLE`: ``train.epochs``,
  data-free ``schedule.rounds``), which is recorded in ``extensions``. The training loops then
  stretch the rest of their learning-rate schedule over the new length (no jump back up, see
  :func:`kdguard.optim.schedule_progress`).
* files but no ``run.json`` (another tool's directory, or a run of an older kdguard) → refused,
  unless ``--overwrite``, or ``--resume`` for an older run whose ``config.yaml`` matches the job.

Python callers get the same checks; ``with run_policy(resume=..., overwrite=...):`` sets the
choices and releases the locks taken inside when the block ends. Without a policy block, a
process holds the lock of its latest run until it opens the next one or exits.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import KDGuardError

RUN_FILE = "run.json"
LOCK_FILE = ".kdguard.lock"
CONFIG_FILE = "config.yaml"
FORMAT = 1

#: Leaf names that never change a run's results, dropped wherever they occur: progress bars, the
#: device (a run may continue on another machine), evaluation/feature batch sizes and data roots
#: (where the same files live). Thread counts are no config key (``$KDGUARD_NUM_THREADS``).
IGNORED_LEAVES = frozenset({"progress", "device", "eval_batch_size", "feature_batch_size", "root"})
#: Dotted keys that never change results: the directory itself, where a data-free run stops
#: (it resumes from there exactly) and how often it checkpoints.
IGNORED_PATHS = frozenset({"out", "schedule.stop_after", "monitor.checkpoint_every"})
#: Settings added after kdguard 0.1.0, as (section name, key) → the value that reproduces the
#: behaviour before them: left out of the fingerprint while they hold it, so the run directories
#: made before they existed keep their identity.
NEUTRAL_ADDED = {("optim", "betas"): [0.9, 0.999], ("optim", "grad_clip"): None,
                 ("student_optim", "warmup_epochs"): 0, ("generator_optim", "warmup_epochs"): 0,
                 ("sr", "nchw"): True, ("", "unlearn"): {"trigger": None, "share": 0.2},
                 ("detox", "only"): False, ("sr", "from_audit"): None, ("sr", "audit_class"): None,
                 ("sr", "audit_reference"): "student", ("sr", "search"): "kl", ("sr", "l1"): 0.01,
                 ("sr", "sparse_steps"): 50, ("sr", "unlearn"): "kl",
                 ("sr", "oracle_trigger"): False, ("sr", "modules"): None}
#: All keys left out of the fingerprint (documentation; :func:`identity_config` applies them).
IGNORED_KEYS = tuple(sorted(IGNORED_PATHS)) + tuple(f"*.{k}" for k in sorted(IGNORED_LEAVES))
#: Keys ``--resume`` may raise: the length of training (epochs, data-free rounds).
EXTENDABLE = ("train.epochs", "schedule.rounds")
#: What a run that stopped before computing anything leaves behind.
BOOKKEEPING = frozenset({RUN_FILE, CONFIG_FILE, LOCK_FILE})
PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


# -- policy and locks ------------------------------------------------------------------------------

@dataclass
class RunPolicy:
    """What to do with a run directory that holds another run (see the module docstring)."""

    resume: bool = False
    overwrite: bool = False
    held: list[str] = field(default_factory=list)  # locks taken by runs opened under this policy

    def release(self) -> None:
        while self.held:
            key = self.held.pop()
            lock = _HELD.pop(key, None)
            if lock is not None:
                lock.release(force=True)


_POLICY: contextvars.ContextVar[RunPolicy | None] = contextvars.ContextVar("kdguard_run_policy", default=None)
_IMPLICIT = RunPolicy()   # Python callers without a policy block: one run at a time per process
_HELD: dict[str, Any] = {}  # resolved directory → FileLock held by this process


def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release(force=True)
    _HELD.clear()


atexit.register(_release_all)


@contextlib.contextmanager
def run_policy(*, resume: bool = False, overwrite: bool = False) -> Iterator[RunPolicy]:
    """Run jobs under a policy for existing run directories; their locks are released on exit.

    Args:
        resume: continue a run whose only difference is a longer training (``train.epochs``,
            ``schedule.rounds``; the CLI's ``--resume``).
        overwrite: remove what the directory holds and start over (``--overwrite``).

    Raises:
        KDGuardError: both ``resume`` and ``overwrite``.
    """
    if resume and overwrite:
        raise KDGuardError("--resume and --overwrite were both given",
                           "give --resume to continue the run or --overwrite to replace it, not both")
    policy = RunPolicy(resume=bool(resume), overwrite=bool(overwrite))
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)
        policy.release()


def current_policy() -> RunPolicy:
    """The innermost :func:`run_policy` (the default, neither resume nor overwrite, outside one)."""
    return _POLICY.get() or _IMPLICIT


def _lock(out: Path, policy: RunPolicy) -> None:
    from filelock import FileLock, Timeout

    key = str(out.resolve())
    if key in _HELD:  # this process already runs there (an outer call, or the previous job)
        return
    lock = FileLock(str(out / LOCK_FILE), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise KDGuardError(f"run directory {str(out)!r} is in use by another kdguard process "
                           f"(lock {str(out / LOCK_FILE)!r})",
                           "wait for that run to finish, or choose another out=") from None
    except OSError as e:
        raise _unwritable(out, e) from None
    _HELD[key] = lock
    policy.held.append(key)


def _unlock(out: Path, policy: RunPolicy) -> None:
    key = str(out.resolve())
    if key in policy.held:
        policy.held.remove(key)
        lock = _HELD.pop(key, None)
        if lock is not None:
            lock.release(force=True)


# -- the output path -------------------------------------------------------------------------------

def _unwritable(out: Path, e: OSError) -> KDGuardError:
    return KDGuardError(f"cannot write run directory {str(out)!r} ({e.strerror or type(e).__name__})",
                        "choose a writable location for out=")


def resolve_out(out: str | Path) -> Path:
    """``out`` with ``~`` expanded, created as a directory.

    Raises:
        KDGuardError: ``out`` or one of its parents is a regular file; ``out`` is in ``/proc``,
            ``/sys`` or ``/dev``; the directory cannot be created (read-only, no permission).
    """
    out = Path(os.path.expanduser(str(out)))
    absolute = Path(os.path.abspath(out))
    for pseudo in PSEUDO_FILESYSTEMS:
        if absolute == Path(pseudo) or Path(pseudo) in absolute.parents:
            raise KDGuardError(f"out={str(out)!r} is inside {pseudo}, a system pseudo-filesystem",
                               "choose a run directory on a real disk for out=")
    for p in (absolute, *absolute.parents):
        if p.exists() and not p.is_dir():
            what = "is" if p == absolute else f"is under {str(p)!r}, which is"
            raise KDGuardError(f"out={str(out)!r} {what} a file, not a directory",
                               "choose another out= directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(out, e) from None
    return out


# -- identity --------------------------------------------------------------------------------------

def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(neutral, list):
        return list(value) == neutral
    if isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    return value == neutral


def _drop(value: Any, path: str, drop: frozenset[str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if str(k) in IGNORED_LEAVES or sub in IGNORED_PATHS or sub in drop:
                continue
            section = path.rsplit(".", 1)[-1]
            if (section, str(k)) in NEUTRAL_ADDED and _same(v, NEUTRAL_ADDED[section, str(k)]):
                continue
            out[str(k)] = _drop(v, sub, drop)
        return out
    if isinstance(value, (list, tuple)):
        return [_drop(v, path, drop) for v in value]
    return value


def identity_config(config: dict[str, Any], *, parents: Iterable[str] = (),
                    volatile: Iterable[str] = ()) -> dict[str, Any]:
    """``config`` (a job as plain containers) without the keys that do not change results.

    Drops :data:`IGNORED_PATHS`, every key named as in :data:`IGNORED_LEAVES`, the ``parents``
    (their paths; their weights' digests stand for them), the job's own ``volatile`` keys and the
    :data:`NEUTRAL_ADDED` settings while they hold their neutral value.
    """
    return _drop(config, "", frozenset(parents) | frozenset(volatile))


def weights_digest(path: str | Path) -> str | None:
    """sha256 (hex) of a weights file, or of ``model.safetensors`` in a run directory; ``None``
    when there is none (the job's loader reports it)."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_kind(job: Any) -> str:
    """The job's kind in its run identity: the class attribute ``RUN_KIND`` when the class sets
    one (a schema composed of others keeps the kind of the job it extends), else the class name.
    A class moved to another module keeps its kind, so its run directories stay valid."""
    kind = getattr(type(job), "RUN_KIND", None)
    return kind if isinstance(kind, str) else type(job).__name__


def job_record(job: Any, *, parents: Iterable[str] = (), volatile: Iterable[str] = ()) -> dict[str, Any]:
    """The identity part of ``run.json`` for ``job`` (a structured-config dataclass)."""
    from .config import to_dict

    parents = tuple(parents)
    config = to_dict(job)
    ident = identity_config(config, parents=parents, volatile=volatile)
    parent_info = {}
    for key in parents:
        path = config.get(key)
        if path:
            parent_info[key] = {"path": str(path), "sha256": weights_digest(path)}
    body = {"job": job_kind(job), "config": ident,
            "parents": {k: v["sha256"] for k, v in parent_info.items()}, "kdguard": __version__}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode())
    return {"format": FORMAT, "job": body["job"], "fingerprint": digest.hexdigest(), "kdguard": __version__,
            "config": ident, "parents": parent_info}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


_ABSENT = object()


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every difference of two ``run.json`` identities."""
    diffs: list[tuple[str, Any, Any]] = []
    if old.get("job") != new.get("job"):
        diffs.append(("job", old.get("job"), new.get("job")))
    a, b = _flatten(old.get("config") or {}), _flatten(new.get("config") or {})
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va != vb:
            diffs.append((key, va, vb))
    pa, pb = old.get("parents") or {}, new.get("parents") or {}
    for key in sorted(set(pa) | set(pb)):
        da, db = (pa.get(key) or {}).get("sha256"), (pb.get(key) or {}).get("sha256")
        if da != db:
            diffs.append((f"{key} weights", _sha(da, pa.get(key)), _sha(db, pb.get(key))))
    if old.get("kdguard") != new.get("kdguard"):
        diffs.append(("kdguard version", old.get("kdguard"), new.get("kdguard")))
    return diffs


def _sha(digest: str | None, info: dict | None) -> str:
    where = f" ({info['path']})" if info and info.get("path") else ""
    return (f"sha256 {digest[:12]}…" if digest else "none") + where


def _show(v: Any, width: int | None = 60) -> str:
    if v is _ABSENT:
        return "(absent)"
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if width is None or len(text) <= width else text[:width - 3] + "..."


def describe(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """``key: old -> new; ...`` (at most ``limit`` entries, then how many more; long values are
    cut, except the weights' digests and paths)."""
    def show(key: str, v: Any) -> str:
        return _show(v, None if key.endswith(" weights") else 60)

    shown = "; ".join(f"{k}: {show(k, a)} -> {show(k, b)}" for k, a, b in diffs[:limit])
    return shown + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def _extension(diffs: list[tuple[str, Any, Any]]) -> list[dict[str, Any]] | None:
    """The diffs as extensions when every one lengthens training, else None."""
    out = []
    for key, a, b in diffs:
        if key not in EXTENDABLE or not isinstance(a, int) or not isinstance(b, int) or b <= a:
            return None
        out.append({"key": key, "from": a, "to": b})
    return out


# -- the directory ---------------------------------------------------------------------------------

def _entries(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name != LOCK_FILE)


def _is_stale_temporary(p: Path) -> bool:
    # kdguard.io.atomic_write's temporaries, left behind by a killed process
    return p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()


def _refuse_to_clear(out: Path) -> None:
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor) or target == Path.home().resolve() or target == cwd or target in cwd.parents:
        raise KDGuardError(f"--overwrite would empty {str(out)!r} (the filesystem root, the home directory, "
                           "or the working directory or one of its parents)",
                           "choose a dedicated run directory for out=")


def clear_directory(out: Path) -> None:
    """Remove everything in run directory ``out`` but its lock file (``--overwrite``)."""
    _refuse_to_clear(out)
    try:
        for p in _entries(out):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    except OSError as e:
        raise _unwritable(out, e) from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "fingerprint" not in record:
            raise ValueError("no fingerprint")
        return record
    except (OSError, ValueError) as e:
        raise KDGuardError(f"{str(path)!r} cannot be read as a kdguard run record ({type(e).__name__})",
                           "pass --overwrite to replace the run, or choose another out=") from None


def _older_run_config(out: Path, parents: Iterable[str], volatile: Iterable[str]) -> dict[str, Any] | None:
    """The identity config of an older run's ``config.yaml`` (read as data), or None."""
    import yaml

    path = out / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return identity_config(config, parents=parents, volatile=volatile) if isinstance(config, dict) else None


def _mismatch(out: Path, diffs: list[tuple[str, Any, Any]], policy: RunPolicy) -> KDGuardError:
    grows = _extension(diffs) is not None
    if policy.resume:
        fix = ("--resume only lengthens training (train.epochs, schedule.rounds); pass --overwrite to "
               "replace the run, or choose another out=")
    elif grows:
        fix = "pass --resume to continue training to the new length, --overwrite to start over, or another out="
    else:
        fix = ("pass --overwrite to replace it, or choose another out= (--resume only lengthens training: "
               "train.epochs, schedule.rounds)")
    return KDGuardError(f"run directory {str(out)!r} holds a run with other settings ({describe(diffs)})", fix)


def _write_record(out: Path, record: dict[str, Any]) -> None:
    from .io import write_json

    write_json(out / RUN_FILE, record)


def open_run(out: str | Path, job: Any, *, parents: Iterable[str] = (), volatile: Iterable[str] = (),
             write_config: bool = True) -> Path:
    """Create or reopen run directory ``out`` for ``job`` under the current :func:`run_policy`.

    Takes the directory's lock (held until the policy block ends), checks what the directory
    holds (module docstring), writes ``config.yaml`` (the resolved job) and ``run.json``.

    Args:
        out: the run directory (``~`` is expanded).
        job: the job's structured-config dataclass.
        parents: names of the job's fields holding the weights it reads (``teacher``, ``model``,
            ``encoder``): their paths leave the fingerprint, their files' sha256 enter it.
        volatile: more of the job's dotted keys that do not change what the directory holds.
        write_config: write ``config.yaml``.

    Returns:
        The run directory (``~`` expanded).

    Raises:
        KDGuardError: a bad ``out`` (:func:`resolve_out`), a directory in use by another process,
            a directory holding another run or foreign files, ``--overwrite`` of a protected path.
    """
    policy = _POLICY.get()
    if policy is None:
        _IMPLICIT.release()  # the previous run of this process has ended
        policy = _IMPLICIT
    out = resolve_out(out)
    _lock(out, policy)
    try:
        _open_locked(out, job, policy, tuple(parents), tuple(volatile), write_config)
    except BaseException:
        _unlock(out, policy)
        raise
    return out


def _open_locked(out: Path, job: Any, policy: RunPolicy, parents: tuple[str, ...], volatile: tuple[str, ...],
                 write_config: bool) -> None:
    from .config import to_yaml

    new = job_record(job, parents=parents, volatile=volatile)
    if policy.overwrite and _entries(out):
        clear_directory(out)
    entries = _entries(out)
    for p in entries:
        if _is_stale_temporary(p):
            p.unlink(missing_ok=True)
    entries = [p for p in entries if p.exists()]
    work = [p for p in entries if p.name not in BOOKKEEPING]
    record_path = out / RUN_FILE
    if record_path.exists():
        old = _read_record(record_path)
        if old["fingerprint"] == new["fingerprint"]:
            record = {**new, **{k: old[k] for k in ("created", "extensions", "adopted", "forked_from") if k in old}}
        elif not work:
            record = {**new, "created": _now()}
        else:
            diffs = differences(old, new)
            grown = _extension(diffs) if policy.resume else None
            if grown is None:
                raise _mismatch(out, diffs, policy)
            stamp = _now()
            record = {**new, "created": old.get("created", stamp),
                      "extensions": [*old.get("extensions", []), *({**g, "time": stamp} for g in grown)]}
            for k in ("adopted", "forked_from"):
                if k in old:
                    record[k] = old[k]
    elif not work:
        record = {**new, "created": _now()}
    else:
        older = _older_run_config(out, parents, volatile) if policy.resume else None
        if older is None:
            names = ", ".join(p.name for p in work[:3]) + (", ..." if len(work) > 3 else "")
            raise KDGuardError(
                f"run directory {str(out)!r} holds files but no {RUN_FILE} ({names}): another tool's "
                "directory, or a run of an older kdguard",
                "pass --overwrite to replace its contents, --resume to continue an older kdguard run "
                "made with the same settings, or choose another out=")
        diffs = differences({"job": new["job"], "config": older, "kdguard": new["kdguard"]},
                            {**new, "parents": {}})
        grown = _extension(diffs) if diffs else []
        if grown is None:
            raise _mismatch(out, diffs, policy)
        stamp = _now()
        record = {**new, "created": stamp, "adopted": f"an older run's {CONFIG_FILE} ({stamp})"}
        if grown:
            record["extensions"] = [{**g, "time": stamp} for g in grown]
    if write_config:
        from .io import write_text

        write_text(out / CONFIG_FILE, to_yaml(job))
    _write_record(out, record)


def adopt_copy(directory: str | Path, job: Any, *, source: str | Path, parents: Iterable[str] = (),
               volatile: Iterable[str] = ()) -> Path:
    """Make a copy of a run (``source`` copied to ``directory``) the run of ``job``.

    For variants that continue a shared checkpoint with other settings on purpose (a data-free
    run's SR phase, SV on or off: :func:`kdguard.datafree.fork_datafree_run`). ``run.json`` of the
    copy gets ``job``'s identity and ``forked_from`` (the source and its fingerprint), so the job
    then continues the copy instead of refusing it.

    Raises:
        KDGuardError: ``directory`` is not a directory.
    """
    directory = Path(os.path.expanduser(str(directory)))
    if not directory.is_dir():
        raise KDGuardError(f"{str(directory)!r} is not a directory", "copy the run there first")
    old_path = directory / RUN_FILE
    old = _read_record(old_path) if old_path.exists() else {}
    record = {**job_record(job, parents=parents, volatile=volatile), "created": _now(),
              "forked_from": {"path": str(source), "fingerprint": old.get("fingerprint")}}
    if old.get("extensions"):
        record["extensions"] = old["extensions"]
    _write_record(directory, record)
    return directory


def read_run_record(directory: str | Path) -> dict[str, Any] | None:
    """``run.json`` of a run directory, or None without one."""
    path = Path(os.path.expanduser(str(directory))) / RUN_FILE
    return _read_record(path) if path.exists() else None
