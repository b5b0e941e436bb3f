"""CLI command modules beyond the core ones in :mod:`kdguard.cli`.

Each module here registers its commands with ``from ._app import command`` and
``@command("name")`` (:mod:`._app` holds the typer app and the shared options); :func:`kdguard.cli.main` imports every module of this package before
parsing, so a new method's command needs no edit of ``cli.py``.
"""
