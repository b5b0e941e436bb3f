"""Attention transfer (AT): Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

A spatial attention map collapses a feature map ``A ∈ R^{C×H×W}`` over channels,
``F(A) = Σ_c |A_c|^p`` (paper §3.1, with p = 2 in its experiments), normalises it and compares
student and teacher maps at matching stages (paper Eq. 2):
``β/2 · Σ_j ‖ Q_S^j/‖Q_S^j‖₂ − Q_T^j/‖Q_T^j‖₂ ‖_p``.

Three implementations are in use and they differ; each is a named variant here:

============  ==================  =========================  =======================================
variant       map                 normalisation              distance
============  ==================  =========================  =======================================
zagoruyko     ``mean_c A^p``      L2 per sample              ``mean_{n,hw} (a_s − a_t)²`` (MSE)
              (no ``abs``)        (``F.normalize``, ε=1e-12)
nad           ``Σ_c |A|^p``       ÷ (Frobenius norm over     ``mean_{n,hw} (a_s − a_t)²`` (MSE)
                                  H×W + 1e-6)
paper         ``Σ_c |A|^p``       L2 per sample              ``mean_n ‖a_s − a_t‖₂`` (not squared)
============  ==================  =========================  =======================================

* ``zagoruyko``: the authors' code (``at(x) = normalize(x.pow(2).mean(1))``, ``at_loss`` = mean
  of squared differences); also mdistiller, torchdistill ``mode='code'``, ZSKT/ABD. It raises
  to the power p **without** ``abs``, which is the same as the paper for even p or non-negative
  (post-ReLU) features, and differs for odd p on signed features.
* ``nad``: Knowledge-Distillation-Zoo's ``AT``, copied into NAD, BackdoorBench, BackdoorBox and
  paper 1's ``KDistill_ZOO``.
* ``paper``: Eq. 2 with p = 2 (torchdistill ``mode='paper'``): the L2 *distance*, averaged over the
  batch. The paper's β/2 prefactor belongs to the loss weight.

Consequences worth knowing (and tested): after normalisation, ``mean`` vs ``sum`` over channels
only rescales the map by C, which the normalisation removes, and the Frobenius norm of an H×W
map *is* the L2 norm of its flattening. So ``zagoruyko`` and ``nad`` agree up to the two ε
guards (and ``abs`` for odd p); their weights (β = 1000 in both code bases) transfer. The
``paper`` distance is not squared and not divided by H·W, so for one sample
``paper² = zagoruyko · H·W``; its weight does not transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KDGuardError, unknown_name
from ._checks import check_dims, check_same_batch, full_precision, match_spatial

REDUCES = ("mean", "sum")
NORMALIZATIONS = ("l2", "frobenius", "none")
DISTANCES = ("mse", "l2")

_L2_EPS = 1e-12    # F.normalize's default guard (Zagoruyko code, torchdistill, mdistiller)
_FROB_EPS = 1e-6   # KD-Zoo / NAD: ``am / (norm + eps)``


@dataclass(frozen=True)
class ATVariant:
    """One AT recipe: how the map is built and normalised, and how two maps are compared."""

    reduce: str
    normalize: str
    distance: str
    absolute: bool
    source: str


AT_VARIANTS: dict[str, ATVariant] = {
    "zagoruyko": ATVariant("mean", "l2", "mse", False,
                           "szagoruyko/attention-transfer utils.at/at_loss; mdistiller AT"),
    "nad": ATVariant("sum", "frobenius", "mse", True,
                     "AberHu/Knowledge-Distillation-Zoo AT, as used by NAD/BackdoorBench"),
    "paper": ATVariant("sum", "l2", "l2", True,
                       "Zagoruyko & Komodakis 2017, Eq. 2 (p = 2); torchdistill mode='paper'"),
}


@full_precision
def attention_map(fm: torch.Tensor, p: float = 2.0, *, reduce: str = "mean", normalize: str = "l2",
                  absolute: bool = True) -> torch.Tensor:
    """Spatial attention map of a feature map (Zagoruyko & Komodakis 2017, §3.1).

    Args:
        fm: ``N×C×H×W`` features.
        p: exponent applied elementwise (> 0; 2 in the paper and all reference codes).
        reduce: ``"mean"`` or ``"sum"`` over channels.
        normalize: ``"l2"`` (divide each sample's flattened map by ``max(‖·‖₂, 1e-12)``),
            ``"frobenius"`` (divide by the Frobenius norm over H×W plus 1e-6, KD-Zoo/NAD) or
            ``"none"``.
        absolute: use ``|A|^p`` (paper, NAD) rather than ``A^p`` (Zagoruyko's code).

    Returns:
        ``N×(H·W)`` float32 map, unit L2 norm per sample (up to ε) unless ``normalize="none"``.

    Raises:
        KDGuardError: ``fm`` is not 4-D, ``p <= 0``, a fractional p without ``absolute``, or an
            unknown option.
    """
    check_dims("attention-transfer feature map", fm, (4,))
    if p <= 0:
        raise KDGuardError(f"attention exponent p={p!r} must be > 0", "use attention_map(fm, p=2) as in the paper")
    if not absolute and float(p) != int(p):  # a fractional power of a negative value is NaN
        raise KDGuardError(f"attention exponent p={p!r} without abs needs an integer p",
                           "use an integer p, or the absolute value |A|^p of variant 'nad' or 'paper'")
    if reduce not in REDUCES:
        raise KDGuardError(f"unknown attention reduce {reduce!r}", "use 'mean' or 'sum'")
    if normalize not in NORMALIZATIONS:
        raise KDGuardError(f"unknown attention normalisation {normalize!r}",
                           "use 'l2', 'frobenius' or 'none'")
    x = fm.float()
    x = (x.abs() if absolute else x).pow(p)
    q = (x.mean(1) if reduce == "mean" else x.sum(1)).flatten(1)
    if normalize == "l2":
        return F.normalize(q, p=2.0, dim=1, eps=_L2_EPS)
    if normalize == "frobenius":
        return q / (q.norm(p=2, dim=1, keepdim=True) + _FROB_EPS)
    return q


@full_precision
def at_zagoruyko(fm: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Map of Zagoruyko's code: ``F.normalize(fm.pow(p).mean(1).flatten(1))``."""
    v = AT_VARIANTS["zagoruyko"]
    return attention_map(fm, p, reduce=v.reduce, normalize=v.normalize, absolute=v.absolute)


@full_precision
def at_nad(fm: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Map of KD-Zoo/NAD: ``Σ_c |fm|^p`` divided by its Frobenius norm over H×W (+1e-6)."""
    v = AT_VARIANTS["nad"]
    return attention_map(fm, p, reduce=v.reduce, normalize=v.normalize, absolute=v.absolute)


@full_precision
def at_paper(fm: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Map of the paper (§3.1, Eq. 2): ``Σ_c |fm|^p``, L2-normalised per sample."""
    v = AT_VARIANTS["paper"]
    return attention_map(fm, p, reduce=v.reduce, normalize=v.normalize, absolute=v.absolute)


@full_precision
def attention_distance(a_s: torch.Tensor, a_t: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """Compare two ``N×M`` attention maps: ``"mse"`` = mean over N·M of squared differences;
    ``"l2"`` = mean over N of the per-sample Euclidean distance."""
    if distance not in DISTANCES:
        raise KDGuardError(f"unknown attention distance {distance!r}", "use 'mse' or 'l2'")
    diff = a_s - a_t
    if distance == "mse":
        return diff.pow(2).mean()
    return diff.norm(p=2, dim=1).mean()


@full_precision
def attention_loss(fs: torch.Tensor, ft: torch.Tensor, *, variant: str = "zagoruyko",
                   p: float = 2.0) -> torch.Tensor:
    """AT loss for one pair of stages under a named variant (see the module table).

    Args:
        fs: student features ``N×C_s×H_s×W_s``.
        ft: teacher features ``N×C_t×H_t×W_t``; channel counts may differ (the map sums them
            away). If the spatial sizes differ, the larger map is adaptive-average-pooled to the
            smaller one first (mdistiller's rule).
        variant: ``"zagoruyko"`` (default), ``"nad"`` or ``"paper"``.
        p: exponent (2 in all references).

    Returns:
        Float32 scalar ≥ 0; zero when ``fs == ft``. Not multiplied by any weight β.

    Raises:
        KDGuardError: unknown variant, non-4-D features or different batch sizes.
    """
    if variant not in AT_VARIANTS:
        raise unknown_name("attention-transfer variant", variant, AT_VARIANTS)
    v = AT_VARIANTS[variant]
    check_dims("student attention-transfer features", fs, (4,))
    check_dims("teacher attention-transfer features", ft, (4,))
    check_same_batch(fs, ft)
    fs, ft = match_spatial(fs, ft)
    a_s = attention_map(fs, p, reduce=v.reduce, normalize=v.normalize, absolute=v.absolute)
    a_t = attention_map(ft, p, reduce=v.reduce, normalize=v.normalize, absolute=v.absolute)
    return attention_distance(a_s, a_t, v.distance)
