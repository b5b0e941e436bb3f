"""Distillers: small modules whose training forward returns student logits and named losses."""

from .base import Distiller, LogitKD

__all__ = ["Distiller", "LogitKD"]
