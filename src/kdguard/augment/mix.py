"""CutMix (Yun et al., ICCV 2019) without labels, as ABD's OOD distillation uses it."""

from __future__ import annotations

import math
import random

import torch

from ..errors import KDGuardError
from ._random import check_batch


def cutmix(x: torch.Tensor, *, beta: float, prob: float, generator: torch.Generator,
           host_rng: random.Random) -> torch.Tensor:
    """CutMix without labels (KD needs none): paste one random box from a shuffled copy.

    With probability ``prob``: ``λ ~ Beta(β, β)``, a box of side ``√(1−λ)·(H, W)`` centred at a
    uniform pixel (clipped at the borders), filled from ``x[perm]`` (ABD ``vanilla_kd_ood.py``,
    ``rand_bbox``). ``x`` ``N×C×H×W`` → a new tensor of the same shape.

    Raises:
        KDGuardError: ``beta <= 0`` or ``prob`` outside [0, 1].
    """
    check_batch(x, "cutmix")
    if beta <= 0 or not 0.0 <= prob <= 1.0:
        raise KDGuardError(f"cutmix beta={beta}, prob={prob} are invalid",
                           "use beta > 0 (ABD: 0.25) and prob in [0, 1] (ABD: 1.0)")
    if host_rng.random() >= prob:
        return x
    lam = host_rng.betavariate(beta, beta)
    n, _, h, w = x.shape
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = host_rng.randrange(h), host_rng.randrange(w)
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    if y2 <= y1 or x2 <= x1:
        return x
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x.device)
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return out
