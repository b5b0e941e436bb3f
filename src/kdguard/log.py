"""kdguard's progress lines through the standard :mod:`logging` module, and when to draw bars.

Every module logs to a child of the ``kdguard`` logger (``logging.getLogger(__name__)``): one
INFO line per epoch or evaluated round (``[teacher] epoch 3/30 ce=0.41 …``), DEBUG lines with
learning rates, interval losses and the files read. As a library kdguard installs no handler
(the records reach whatever the application configured); the CLI calls
:func:`configure_logging` (``--quiet``: warnings only, ``--verbose``: debug lines too).

Progress bars (tqdm) are drawn only on a terminal (``disable=None``), so a redirected log file
holds plain lines, never carriage returns or cursor codes; :func:`bar_disabled` also turns them
off for ``progress=false`` and under ``--quiet``.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Optional

from tqdm.auto import tqdm

#: the parent of every kdguard logger
LOGGER_NAME = "kdguard"

logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())

_PLAIN = "%(message)s"
_DETAILED = "%(levelname)s %(name)s: %(message)s"


class _CLIHandler(logging.Handler):
    """Lines through ``tqdm.write``, which lifts a bar on the same stream out of the way; the
    stream is looked up at each record unless one was given."""

    def __init__(self, stream: Optional[IO[str]] = None) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if self.stream is None else self.stream
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def configure_logging(level: int = logging.INFO, stream: Optional[IO[str]] = None) -> None:
    """Print kdguard's log records of ``level`` and above as lines on ``stream``.

    Args:
        level: ``logging.INFO`` (progress lines), ``logging.WARNING`` (quiet) or
            ``logging.DEBUG`` (verbose: each line names its level and logger).
        stream: where the lines go; default ``sys.stderr`` as it is at each line (stdout keeps
            the results a command prints).

    Calling it again replaces the handler it installed before. The ``kdguard`` logger stops
    propagating to the root logger, so an application's own handlers do not print a line twice.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _CLIHandler)]:
        logger.removeHandler(old)
    handler = _CLIHandler(stream)
    handler.setFormatter(logging.Formatter(_DETAILED if level <= logging.DEBUG else _PLAIN))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def bar_disabled(progress: bool = True) -> Optional[bool]:
    """The ``disable=`` argument of a tqdm bar: ``True`` (no bar) when ``progress`` is off or the
    ``kdguard`` logger is set above INFO (``--quiet``), else ``None`` (a bar on a terminal only)."""
    if not progress or logging.getLogger(LOGGER_NAME).level > logging.INFO:
        return True
    return None
