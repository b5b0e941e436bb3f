"""Distillers: small modules whose training forward returns student logits and named losses.

* :class:`Distiller`, :class:`LogitKD`: the contract and Hinton KD (``base``).
* :class:`FeatureDistiller`: any weighted combination of terms on tapped features (``feature``).
* :data:`KD_METHODS`, :func:`build_distiller`: methods by name, e.g. ``"at+kd"`` (``methods``).
* :mod:`kdguard.distill.terms`: the terms (learnable parts of each method).
* :func:`feature_shapes`, :class:`GuardedTaps`: dry runs and safe feature hooks (``probe``).
"""

from .base import Distiller, LogitKD
from .feature import FeatureDistiller
from .methods import KD_METHODS, BuildContext, build_distiller, parse_method
from .probe import GuardedTaps, Probe, feature_shapes, probe

__all__ = ["KD_METHODS", "BuildContext", "Distiller", "FeatureDistiller", "GuardedTaps", "LogitKD",
           "Probe", "build_distiller", "feature_shapes", "parse_method", "probe"]
