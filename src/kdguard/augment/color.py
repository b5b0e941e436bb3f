"""Colour augmentations on whole float batches in [0, 1], each drawing from an explicit generator.

* :func:`color_jitter`: torchvision-style ``RandomApply([ColorJitter(b, c, s, h)], p)`` (SimCLR,
  BadEncoder), the four operations in a random order per image.
* :func:`random_grayscale`: ITU-R BT.601 luma in every channel with a probability.
* :func:`bcs_jitter`: a cheaper brightness/contrast/saturation jitter in a fixed order (the
  single-image patches of ABD's OOD data).
"""

from __future__ import annotations

import torch

from ..errors import KDGuardError, check_range
from ._random import check_batch, rand, uniform

#: ITU-R BT.601 luma weights (torchvision's ``rgb_to_grayscale``).
LUMA = (0.299, 0.587, 0.114)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``N×1×H×W`` of an RGB batch ``N×3×H×W`` (BT.601 weights); a 1-channel batch is returned as is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB ``N×3×H×W`` in [0, 1] → HSV ``N×3×H×W``, all three in [0, 1] (H in turns).

    The hexcone model (Smith 1978): ``V = max``, ``S = (max − min)/max`` (0 where max = 0), H from
    the dominant channel; grey pixels get H = 0.
    """
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    h = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV ``N×3×H×W`` (all in [0, 1]) → RGB ``N×3×H×W`` in [0, 1].

    Closed form: channel ``n ∈ {5, 3, 1}`` (R, G, B) is ``V − V·S·clamp(min(k, 4 − k), 0, 1)`` with
    ``k = (n + 6H) mod 6``.
    """
    h, s, v = hsv.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * h) % 6
        out.append(v - v * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor·a + (1 − factor)·b`` clipped to [0, 1] (torchvision's ``_blend``); factor ``N``."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


def _jitter_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    if op == 0:  # brightness
        return _blend(x, torch.zeros_like(x), factor)
    if op == 1:  # contrast: blend with the mean grey level of each image
        mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(x, mean.expand_as(x), factor)
    if op == 2:  # saturation
        return _blend(x, grayscale(x).expand_as(x), factor)
    hsv = rgb_to_hsv(x)  # hue
    hsv = torch.stack([(hsv[:, 0] + factor.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv)


def color_jitter(x: torch.Tensor, *, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1, p: float = 0.8,
                 generator: torch.Generator) -> torch.Tensor:
    """torchvision-style ``RandomApply([ColorJitter(b, c, s, h)], p)`` on a batch, per image.

    Args:
        x: float ``N×C×H×W`` in [0, 1] (C = 1: only brightness and contrast apply).
        brightness, contrast, saturation: strengths ``a ≥ 0``; factors ``~ U[max(0, 1−a), 1+a]``.
        hue: strength in ``[0, 0.5]``; shift ``~ U[−hue, hue]`` turns.
        p: probability that an image is jittered at all.
        generator: CPU generator for the random factors and the per-image order of the four ops.

    Returns:
        A new float ``N×C×H×W`` batch in [0, 1].

    Raises:
        KDGuardError: a negative strength, ``hue`` outside [0, 0.5] or ``p`` outside [0, 1].
    """
    check_batch(x, "color_jitter", floating=True)
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if v < 0:
            raise KDGuardError(f"color jitter {name} {v!r} is negative", "give a strength >= 0, e.g. 0.4")
    check_range("color jitter hue", hue, 0.0, 0.5)
    check_range("color jitter probability", p, 0.0, 1.0)
    n = x.shape[0]
    apply = rand(n, generator) < p
    strengths = (brightness, contrast, saturation)
    factors = [uniform(n, max(0.0, 1 - a), 1 + a, generator) for a in strengths]
    factors.append(uniform(n, -hue, hue, generator))
    identity = (1.0, 1.0, 1.0, 0.0)
    order = torch.argsort(rand((n, 4), generator), dim=1)  # a random permutation per image
    ops = (0, 1) if x.shape[1] == 1 else (0, 1, 2, 3)
    out = x.float()
    for step in range(4):
        for op in ops:
            # images whose op at this step is `op`; the others get the identity factor
            chosen = (order[:, step] == op) & apply
            if not chosen.any():
                continue
            if op == 3:  # the HSV round trip is the costly one: only on the chosen images
                idx = chosen.nonzero().squeeze(1).to(x.device)
                out = out.index_copy(0, idx, _jitter_op(out[idx], op, factors[op][chosen].to(x.device)))
            else:  # blends are cheap elementwise ops: run them on the whole batch
                f = torch.where(chosen, factors[op], torch.full_like(factors[op], identity[op]))
                out = _jitter_op(out, op, f.to(x.device))
    return out if out is not x else x.clone()


def random_grayscale(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each RGB image by its luma in all channels with probability ``p`` (C = 1: unchanged)."""
    check_batch(x, "random_grayscale", floating=True)
    check_range("grayscale probability", p, 0.0, 1.0)
    chosen = (rand(x.shape[0], generator) < p).to(x.device)
    if x.shape[1] == 1:
        return x.clone()
    return torch.where(chosen.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)


def bcs_jitter(x: torch.Tensor, *, prob: float, strength: float = 0.4,
               generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter (factors ``U(1−s, 1+s)``), per sample with
    probability ``prob``; result clamped to [0, 1]. ``x`` float ``N×C×H×W`` in [0, 1]."""
    check_batch(x, "bcs_jitter")
    n, c = x.shape[:2]
    dev = x.device
    apply = (uniform(n, 0.0, 1.0, generator, dev) < prob).view(n, 1, 1, 1)
    b, k, s = (uniform(n, 1 - strength, 1 + strength, generator, dev).view(n, 1, 1, 1) for _ in range(3))
    out = x * b
    gray = out.mean(dim=1, keepdim=True) if c == 1 else (
        0.299 * out[:, :1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
    out = (out - gray.mean(dim=(2, 3), keepdim=True)) * k + gray.mean(dim=(2, 3), keepdim=True)
    if c == 3:
        gray = 0.299 * out[:, :1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]
        out = gray + (out - gray) * s
    return torch.where(apply, out.clamp(0.0, 1.0), x)
