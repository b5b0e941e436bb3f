"""Model zoo: CIFAR-style architectures in plain torch, their registry and feature tap presets.

Every model takes ``float`` images in ``[0, 1]`` (``N×C×H×W``, C = 1 or 3, e.g. 32×32 or 28×28),
normalises them inside (``model.normalize``) and returns ``N×num_classes`` logits. Build one with
:func:`build_model`; list the names with ``MODELS.names()``; get feature tap points with
:func:`stage_paths`.
"""

from __future__ import annotations

from .common import Normalize, check_model_args
from .registry import MODELS, build_model, model_info
from .stages import PRESET_KINDS, STAGE_PRESETS, stage_paths

__all__ = ["MODELS", "PRESET_KINDS", "STAGE_PRESETS", "Normalize", "build_model", "check_model_args",
           "model_info", "stage_paths"]
