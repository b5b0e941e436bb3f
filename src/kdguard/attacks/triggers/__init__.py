"""Backdoor triggers: pure, batched, seeded image transforms with a name registry.

Use :func:`build_trigger` (or the classes) to build one for an image shape, then call it on uint8
(0–255) or float (0–1) images. ``TRIGGERS.names()`` lists what is available; ``patch`` reads
its pattern and mask from the user's files, and :class:`FunctionTrigger` wraps the user's own
batched function.
"""

from __future__ import annotations

from .additive import (AdditiveTrigger, L2Invisible, Trojan3x3, Trojan8x8, TrojanPatch,
                       TrojanWatermark)
from .base import TRIGGERS, Trigger, build_trigger, register_trigger
from .blend import Blend
from .function import FunctionTrigger, load_trigger_function
from .global_transforms import ColorFilter, LowFrequency
from .patch import BadNetsGrid, BadNetsSquare, FilePatch, L0Invisible, PatchReplaceTrigger
from .sig import SIG
from .wanet import WaNet

__all__ = [
    "TRIGGERS", "AdditiveTrigger", "BadNetsGrid", "BadNetsSquare", "Blend", "ColorFilter", "FilePatch",
    "FunctionTrigger", "L0Invisible", "L2Invisible", "LowFrequency", "PatchReplaceTrigger", "SIG", "Trigger",
    "Trojan3x3", "Trojan8x8", "TrojanPatch", "TrojanWatermark", "WaNet", "build_trigger",
    "load_trigger_function", "register_trigger",
]
