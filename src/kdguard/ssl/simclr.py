"""SimCLR: the NT-Xent contrastive loss and the pre-training / fine-tuning job.

Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations" (ICML 2020). A batch of N images gives 2N augmented views; with the projections
``z`` L2-normalised and ``sim(u, v) = uᵀv``, the loss of the positive pair ``(i, j)`` is (Eq. 1)

    ℓ(i, j) = −log( exp(sim(z_i, z_j)/τ) / Σ_{k=1..2N, k≠i} exp(sim(z_i, z_k)/τ) ),

and the batch loss is the mean of ℓ over all 2N anchors (each view is the anchor once, its twin
the positive, the other 2N − 2 views the negatives). τ = 0.5 in BadEncoder's and paper 1's SimCLR
code (``--knn-t 0.5`` doubles as the temperature). This is exactly their ``sim_matrix`` /
``pos_sim`` computation, written as a cross-entropy over the masked similarity matrix.

Training defaults (BadEncoder ``pretraining_encoder.py``, also paper 1's ``distillation.py``):
Adam, lr 1e-3, weight decay 1e-6, constant learning rate, batch 256 (paper 1: 128), 1000 epochs
on CIFAR-10 (see ``docs/ssl.md`` for the CPU-scale preset).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..errors import KDGuardError
from ..augment import SimCLRAugment
from .encoder import SSLModel
from .loop import EpochLog, SSLLoop


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent loss of N positive pairs ``(z1[i], z2[i])`` (SimCLR, Chen et al. 2020, Eq. 1).

    Args:
        z1, z2: projections of the two views, ``N×d`` each (any float dtype; computed in
            float32). They are L2-normalised here.
        temperature: τ > 0 (0.5 in BadEncoder / paper 1).

    Returns:
        Float32 scalar: the mean over the 2N anchors of ``−log softmax`` of the positive's
        similarity among the 2N − 1 other views. With N = 1 it is 0 (no negatives).

    Raises:
        KDGuardError: shapes differ or are not ``N×d`` with N ≥ 1, or τ ≤ 0.
    """
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise KDGuardError(f"NT-Xent needs two N×d projections of the same shape, got "
                           f"{tuple(z1.shape)} and {tuple(z2.shape)}", "pass the two views' projections")
    if temperature <= 0:
        raise KDGuardError(f"NT-Xent temperature {temperature!r} must be > 0", "use 0.5 (BadEncoder)")
    n = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):  # similarities in float32 even under bf16 autocast
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = z @ z.t() / temperature
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, positives)


def simclr_step(model: SSLModel, images: torch.Tensor, loop: SSLLoop, augment: SimCLRAugment,
                temperature: float) -> dict[str, torch.Tensor]:
    """One SimCLR step on a uint8 batch: two augmented views → ``{"simclr": NT-Xent}``.

    Under torchrun every process augments the whole batch, encodes its shard of the views, and
    computes NT-Xent over the gathered projections of the whole batch (the negatives of one
    process's anchors are all 2N − 2 other views, as in one process)."""
    x = images.to(loop.device, non_blocking=True)
    net = loop.forward(model)
    _, z1 = net(loop.layout(loop.shard(augment(x, loop.generator))))
    _, z2 = net(loop.layout(loop.shard(augment(x, loop.generator))))
    return {"simclr": nt_xent(loop.gather(z1), loop.gather(z2), temperature)}


def train_simclr(model: SSLModel, images: torch.Tensor, cfg: TrainConfig, *,
                 augment: SimCLRAugment | None = None, temperature: float = 0.5,
                 run_dir: str | Path | None = None, seed: int = 0, desc: str = "simclr") -> list[EpochLog]:
    """Train ``model`` (encoder + head, in place) with SimCLR on uint8 ``images`` (``N×C×H×W``).

    Used for pre-training, for the fine-tuned teacher and the warm-up student of the defence, and
    for the fine-tuning phase of fine-pruning. Resumable from ``run_dir/train_state.pt``.

    Args:
        model: the :class:`SSLModel` to train (all its parameters with ``requires_grad``).
        images: uint8 ``N×C×H×W`` at the encoder's input size (no labels are used).
        cfg: schedule and optimiser (see the module docstring for the defaults).
        augment: view generator (default: the SimCLR CIFAR recipe at the input size).
        temperature: NT-Xent τ.
        run_dir, seed, desc: see :class:`SSLLoop`.

    Returns:
        The per-epoch history (mean ``simclr`` loss per epoch).

    Raises:
        KDGuardError: images not uint8 ``N×C×H×W`` of the encoder's shape, or a loop error.
    """
    expected = tuple(model.encoder.input_shape)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise KDGuardError(f"SimCLR training images have dtype {images.dtype} and shape "
                           f"{tuple(images.shape)}, expected uint8 N×{expected[0]}×{expected[1]}×{expected[2]}",
                           "resize the data to the encoder's input (kdguard.ssl.probe.to_encoder_input)")
    augment = augment or SimCLRAugment()
    loop = SSLLoop(model, cfg, run_dir=run_dir, seed=seed, desc=desc)
    return loop.fit(len(images), lambda idx, lp: simclr_step(model, images[idx], lp, augment, temperature))
