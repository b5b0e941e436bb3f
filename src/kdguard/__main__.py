"""``python -m kdguard``: the same CLI as the ``kdguard`` command."""

from .cli import run

run()
