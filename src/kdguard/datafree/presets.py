"""Method × scale presets: the reference recipes ("paper") and budgets that fit 2 CPU cores ("cpu").

A preset is a nested dict of :class:`~kdguard.datafree.config.DataFreeJob` values applied on top
of the dataclass defaults and below the user's YAML and overrides
(:func:`~kdguard.datafree.config.build_datafree_job`). ``preset=none`` applies nothing.

``paper`` reproduces the reference settings (ABD: WRN-16-2 teacher → WRN-16-1 student on
CIFAR-10):

=========  ==============================================================================
ZSKT       8e4 pseudo-batches of 128, 1 generator + 10 student steps, Adam 2e-3 / 1e-3,
           cosine, clip 5 (ABD ``zskt/main.py``)
DFAD       500 epochs × 50 iterations = 25,000 rounds, 5 student steps, batch 256, SGD 0.1
           wd 5e-4, Adam 1e-3, ×0.1 at epochs 100 and 200 (Fang et al. reference code)
DAFL       200 epochs × 400/5 = 16,000 rounds, 1 g-step + 5 KD steps, batch 256, SGD 0.1
           wd 1e-4 cosine, Adam 1e-3 β=(0.5, 0.999) (CMI code base ``dafl_cifar10.sh``)
DeepInv    200 rounds of 1,000 inversion steps (batch 256, Adam 0.1 β=(0.5, 0.99)) + 400 KD
           steps, SGD 0.1 wd 1e-4 cosine (CMI code base ``deepinv_cifar10.sh``)
CMI        200 rounds of 200 generator steps (batch 256, Adam 1e-3 β=(0.5, 0.999)) + 400 KD
           steps of 128, SGD 0.1 wd 1e-4 cosine (ABD ``cmi_cifar10_poi.yml``)
OOD        300 epochs over 50,000 patches, batch 512, Adam 1e-3, ×0.5 at epoch 150
           (ABD ``ood_cifar10_poi.yml``: MultiStepLR [150, 300, 600], γ 0.5)
=========  ==============================================================================

``cpu`` keeps every loss, weight and optimiser of ``paper`` and shrinks student (ResNet-8),
batch sizes and budgets so one run on CIFAR-10 with a ResNet-20 teacher takes at most about
40 minutes on 2 uncontended CPU cores. The per-round costs behind these budgets (FLOP counts
and measured throughputs) are in ``docs/datafree.md`` §6: ZSKT ≈ 1.4 s/round (1,500 rounds),
DFAD/DAFL ≈ 1.7 s (1,200), DeepInversion ≈ 36 s (40), CMI ≈ 40 s (50), OOD ≈ 17 s/epoch (120).
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import KDGuardError

PRESET_SCALES = ("cpu", "paper", "none")

_SGD_CMI = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine"}
_ADAM_GEN_CMI = {"name": "adam", "lr": 1e-3, "betas": [0.5, 0.999], "schedule": "constant"}

# Values shared by both scales: the losses, weights and optimisers of each method.
_METHOD_BASE: dict[str, dict[str, Any]] = {
    "zskt": {
        "generator": {"kind": "zskt", "latent_dim": 100},
        "student_optim": {"name": "adam", "lr": 2e-3, "schedule": "cosine", "grad_clip": 5.0},
        "generator_optim": {"name": "adam", "lr": 1e-3, "schedule": "cosine", "grad_clip": 5.0},
        "schedule": {"generator_steps": 1, "student_steps": 10, "batch_size": 128},
    },
    "dfad": {
        "generator": {"kind": "dcgan", "latent_dim": 256},
        "student_optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                          "schedule": "multistep", "milestones": [0.2, 0.4], "gamma": 0.1},
        "generator_optim": {"name": "adam", "lr": 1e-3, "schedule": "multistep",
                            "milestones": [0.2, 0.4], "gamma": 0.1},
        "schedule": {"generator_steps": 1, "student_steps": 5},
    },
    "dafl": {
        "generator": {"kind": "dcgan", "latent_dim": 256},
        "student_optim": dict(_SGD_CMI),
        "generator_optim": dict(_ADAM_GEN_CMI),
        "schedule": {"generator_steps": 1, "student_steps": 5},
    },
    "deepinv": {
        "student_optim": dict(_SGD_CMI),
        "generator_optim": {"name": "adam", "lr": 0.1, "betas": [0.5, 0.99], "schedule": "constant"},
    },
    "cmi": {
        "generator": {"kind": "dcgan", "latent_dim": 256},
        "student_optim": dict(_SGD_CMI),
        "generator_optim": dict(_ADAM_GEN_CMI),
    },
    "ood": {
        "student_optim": {"name": "adam", "lr": 1e-3, "schedule": "multistep",
                          "milestones": [0.5], "gamma": 0.5},
        "schedule": {"generator_steps": 1, "student_steps": None},
    },
}

_SCALE: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "zskt": {"schedule": {"rounds": 80000}, "monitor": {"every": 200, "grid_every": 4000,
                                                            "checkpoint_every": 200}},
        "dfad": {"schedule": {"rounds": 25000, "batch_size": 256},
                 "monitor": {"every": 250, "grid_every": 2500, "checkpoint_every": 250}},
        "dafl": {"schedule": {"rounds": 16000, "batch_size": 256},
                 "monitor": {"every": 80, "grid_every": 1600, "checkpoint_every": 80}},
        "deepinv": {"schedule": {"rounds": 200, "generator_steps": 1000, "student_steps": 400,
                                 "batch_size": 256, "synthesis_batch_size": 256},
                    "monitor": {"every": 1, "grid_every": 20, "checkpoint_every": 1}},
        "cmi": {"schedule": {"rounds": 200, "generator_steps": 200, "student_steps": 400,
                             "batch_size": 128, "synthesis_batch_size": 256},
                "monitor": {"every": 1, "grid_every": 20, "checkpoint_every": 1}},
        "ood": {"schedule": {"rounds": 300, "batch_size": 512}, "ood": {"patches": 50000},
                "monitor": {"every": 5, "grid_every": 50, "checkpoint_every": 5}},
    },
    "cpu": {
        "zskt": {"schedule": {"rounds": 1500}, "monitor": {"every": 100, "grid_every": 500,
                                                           "checkpoint_every": 50}},
        "dfad": {"schedule": {"rounds": 1200, "batch_size": 128},
                 "monitor": {"every": 100, "grid_every": 400, "checkpoint_every": 50}},
        "dafl": {"schedule": {"rounds": 1200, "batch_size": 128},
                 "monitor": {"every": 100, "grid_every": 400, "checkpoint_every": 50}},
        "deepinv": {"schedule": {"rounds": 40, "generator_steps": 100, "student_steps": 100,
                                 "batch_size": 128, "synthesis_batch_size": 128},
                    "monitor": {"every": 5, "grid_every": 10, "checkpoint_every": 1}},
        "cmi": {"schedule": {"rounds": 50, "generator_steps": 40, "student_steps": 100,
                             "batch_size": 128, "synthesis_batch_size": 128},
                "cmi": {"bank_size": 8192, "negatives": 1024},
                "monitor": {"every": 5, "grid_every": 10, "checkpoint_every": 1}},
        "ood": {"schedule": {"rounds": 120, "batch_size": 256}, "ood": {"patches": 20000},
                "monitor": {"every": 10, "grid_every": 60, "checkpoint_every": 5}},
    },
}

_STUDENT = {"paper": "wrn16_1", "cpu": "resnet8"}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_values(method: str, scale: str) -> dict[str, Any]:
    """The nested dict of job values that preset ``scale`` sets for ``method``.

    Args:
        method: one of :data:`~kdguard.datafree.config.METHOD_NAMES`.
        scale: ``"cpu"``, ``"paper"`` or ``"none"`` (returns ``{}``).

    Raises:
        KDGuardError: unknown method or scale.
    """
    from .config import METHOD_NAMES

    if scale not in PRESET_SCALES:
        raise KDGuardError(f"preset {scale!r} is not one of {', '.join(PRESET_SCALES)}",
                           "use preset=cpu, preset=paper or preset=none")
    if method not in METHOD_NAMES:
        raise KDGuardError(f"data-free method {method!r} is not one of {', '.join(METHOD_NAMES)}",
                           f"set method= one of: {', '.join(METHOD_NAMES)}")
    if scale == "none":
        return {}
    values = _merge(_METHOD_BASE[method], _SCALE[scale][method])
    values["student"] = _STUDENT[scale]
    return values
