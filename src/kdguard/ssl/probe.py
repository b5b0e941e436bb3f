"""Downstream evaluation of an encoder: a classifier trained on frozen features, then CA and ASR.

The protocol of BadEncoder (Jia et al., S&P 2022, ``training_downstream_classifier.py``) and paper 1:

1. the downstream images are converted to the encoder's input (:func:`kdguard.ssl.data.to_encoder_input`:
   MNIST is resized to 32×32 and repeated to 3 channels);
2. the frozen encoder (eval mode, no gradient) maps the training split to features ``h = f(x)``,
   L2-normalised (``predict_feature``);
3. a classifier is trained on them with cross-entropy: BadEncoder's ``NeuralNet`` (Linear →
   ReLU → Dropout(0.5) → Linear → ReLU → Linear, hidden 512 and 256; Adam lr 1e-4, batch 64,
   500 epochs) or a linear layer;
4. the clean test split gives CA; the same images with the task's trigger stamped on (after
   conversion) give the attack metrics through :func:`kdguard.metrics.backdoor_metrics`:
   **ASR** over the non-target-class images (kdguard's default) and **ASR-all** over all images
   (BadEncoder's ``BadEncoderTestBackdoor`` and paper 1's convention, which stamp every test image).

The encoder is never changed: features are computed once under ``torch.no_grad`` in eval mode
(restoring the previous mode), and only the probe's parameters are optimised.

:func:`knn_accuracy` is the weighted kNN monitor of the SimCLR/BadEncoder code (k = 200, t = 0.5;
Wu et al., CVPR 2018, Eq. 7 weighting) for a label-free quick check of an encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset
from ..errors import KDGuardError, check_range
from ..metrics import backdoor_metrics
from ..runtime import autocast, eval_mode, resolve_device, use_bf16, use_channels_last
from .badencoder import BackdoorTarget
from .config import ProbeConfig
from .data import adapt_dataset, random_subset
from .encoder import Encoder

HEADS = ("mlp", "linear")


@torch.no_grad()
def extract_features(encoder: Encoder, images: torch.Tensor, *, batch_size: int = 512,
                     device: torch.device | str = "cpu", normalize: bool = True,
                     transform=None) -> torch.Tensor:
    """Features of uint8 images ``N×C×H×W`` (the encoder's input shape) → float32 ``N×D`` on CPU.

    ``transform`` (e.g. a trigger) is applied to each uint8 batch first. The encoder runs in eval
    mode (its previous mode is restored) under ``no_grad``; bf16 autocast and channels_last are
    used where :mod:`kdguard.runtime` finds them worthwhile. ``normalize`` L2-normalises each row.

    Raises:
        KDGuardError: images not uint8 of the encoder's input shape.
    """
    shape = tuple(encoder.input_shape)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != shape:
        raise KDGuardError(f"images of dtype {images.dtype} and shape {tuple(images.shape)} do not match "
                           f"the encoder input uint8 N×{shape[0]}×{shape[1]}×{shape[2]}",
                           "convert them with kdguard.ssl.data.to_encoder_input")
    device = resolve_device(str(device)) if isinstance(device, str) else device
    bf16 = use_bf16("auto", device, encoder)
    channels_last = use_channels_last("auto", device, encoder)
    param = next(encoder.parameters())
    home = param.device
    encoder.to(device)
    if channels_last:  # same values, faster convolutions on CPU and recent GPUs
        encoder.to(memory_format=torch.channels_last)
    out = []
    try:
        with eval_mode(encoder):
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                if transform is not None:
                    batch = transform(batch)
                x = batch.to(device).float().div_(255.0)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, bf16):
                    h = encoder(x).float()
                out.append((F.normalize(h, dim=1) if normalize else h).cpu())
    finally:
        encoder.to(home)
    return torch.cat(out) if out else torch.empty(0, encoder.feature_dim)


class ProbeHead(nn.Module):
    """The downstream classifier on features: ``"mlp"`` (BadEncoder's ``NeuralNet``) or ``"linear"``.

    MLP: ``Linear(D, h₁) → ReLU → Dropout(p) → Linear(h₁, h₂) → ReLU → Linear(h₂, K)`` (dropout
    after the first layer only, as in the reference); any number of hidden sizes is accepted.
    Input ``N×D`` float → logits ``N×K``.

    Raises:
        KDGuardError: unknown kind, hidden sizes < 1 or dropout outside [0, 1).
    """

    def __init__(self, in_dim: int, num_classes: int, kind: str = "mlp",
                 hidden: tuple[int, ...] | list[int] = (512, 256), dropout: float = 0.5) -> None:
        super().__init__()
        if kind not in HEADS:
            raise KDGuardError(f"unknown probe head {kind!r}", f"use one of {', '.join(HEADS)}")
        check_range("probe dropout", dropout, 0.0, 1.0, high_open=True)
        if kind == "linear":
            self.net = nn.Linear(in_dim, num_classes)
            return
        sizes = [int(h) for h in hidden]
        if not sizes or min(sizes) < 1:
            raise KDGuardError(f"probe hidden sizes {list(hidden)!r} must be positive", "use e.g. [512, 256]")
        layers: list[nn.Module] = []
        prev = in_dim
        for i, h in enumerate(sizes):
            layers += [nn.Linear(prev, h), nn.ReLU()]
            if i == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig,
                *, seed: int = 0, device: torch.device | str = "cpu") -> ProbeHead:
    """Train a :class:`ProbeHead` on fixed features with cross-entropy (Adam, shuffled batches).

    Args:
        features: float ``N×D``; labels: int64 ``N``.
        cfg: head kind, sizes, dropout, epochs, batch size and learning rate.
        seed: seeds the initialisation, shuffling and dropout.

    Returns:
        The trained head in eval mode, on CPU.

    Raises:
        KDGuardError: mismatched lengths, no data, or bad settings.
    """
    if features.dim() != 2 or len(features) != len(labels) or len(features) == 0:
        raise KDGuardError(f"probe features {tuple(features.shape)} and labels {tuple(labels.shape)} "
                           "do not pair up", "give N×D features and N labels, N >= 1")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise KDGuardError(f"probe epochs={cfg.epochs}, batch_size={cfg.batch_size}, lr={cfg.lr} are not "
                           "positive", "set probe.epochs, probe.batch_size and probe.lr > 0")
    device = resolve_device(str(device)) if isinstance(device, str) else device
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ProbeHead(features.shape[1], num_classes, cfg.head, list(cfg.hidden), cfg.dropout).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    x_all, y_all = features.to(device), labels.to(device)
    n, bs = len(features), min(cfg.batch_size, len(features))
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            loss = F.cross_entropy(head(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval().cpu()


@dataclass(frozen=True)
class ProbeResult:
    """Downstream metrics of one encoder on one dataset (fractions in [0, 1])."""

    dataset: str
    ca: float
    asr: float | None
    asr_all: float | None
    ra: float | None
    target: int | None
    n_train: int
    n_test: int
    n_backdoor: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_encoder(encoder: Encoder, train: ImageDataset, test: ImageDataset, *,
                  target: BackdoorTarget | None, cfg: ProbeConfig, seed: int = 0) -> ProbeResult:
    """Train a probe on ``train`` through the frozen ``encoder`` and measure CA / ASR on ``test``.

    Args:
        encoder: the frozen encoder (unchanged by this call).
        train, test: downstream splits (converted to the encoder's input here if needed; limited
            to ``cfg.train_limit`` / ``cfg.test_limit`` random images).
        target: the backdoor of this task (trigger and target class), or ``None`` for CA only.
        cfg: probe settings. seed: probe initialisation and subsets.

    Returns:
        :class:`ProbeResult` with CA, ASR (non-target images), ASR-all and RA.

    Raises:
        KDGuardError: a target class outside the dataset, or errors of the steps above.
    """
    shape = tuple(encoder.input_shape)
    train = adapt_dataset(random_subset(train, cfg.train_limit, seed), shape)
    test = adapt_dataset(random_subset(test, cfg.test_limit, seed + 1), shape)
    if target is not None and not 0 <= target.target < test.num_classes:
        raise KDGuardError(f"backdoor target class {target.target} is not a class of {test.name!r}",
                           f"give a class index below {test.num_classes}")
    device = resolve_device(cfg.device, setting="probe.device")
    kw = dict(batch_size=cfg.feature_batch_size, device=device, normalize=cfg.normalize)
    head = train_probe(extract_features(encoder, train.images, **kw), train.labels, train.num_classes,
                       cfg, seed=seed, device=device)
    with torch.no_grad():
        clean_pred = head(extract_features(encoder, test.images, **kw)).argmax(1)
        if target is None:
            m = backdoor_metrics(test.labels, clean_pred)
        else:
            bd_pred = head(extract_features(encoder, test.images, transform=target.trigger, **kw)).argmax(1)
            m = backdoor_metrics(test.labels, clean_pred, bd_pred,
                                 torch.full_like(test.labels, target.target), test.labels != target.target)
    return ProbeResult(test.name, m.ca, m.asr, m.asr_all, m.ra, None if target is None else target.target,
                       len(train), m.n_clean, m.n_backdoor)


@torch.no_grad()
def knn_accuracy(encoder: Encoder, memory: ImageDataset, test: ImageDataset, *, k: int = 200,
                 temperature: float = 0.5, device: torch.device | str = "cpu", batch_size: int = 512) -> float:
    """Weighted kNN top-1 accuracy of ``test`` against the ``memory`` bank (label-free monitor).

    Cosine similarities ``s`` of normalised features; each of the k nearest memory items votes for
    its label with weight ``exp(s/t)`` (Wu et al., CVPR 2018; the MoCo/SimCLR CIFAR demo code used by
    BadEncoder's ``knn_predict``, k = 200, t = 0.5). Returns a fraction in [0, 1].

    Raises:
        KDGuardError: ``k`` < 1 or ``temperature`` ≤ 0.
    """
    if k < 1 or temperature <= 0:
        raise KDGuardError(f"kNN k={k}, t={temperature} must be positive",
                           "use knn_accuracy(..., k=200, temperature=0.5)")
    shape = tuple(encoder.input_shape)
    memory, test = adapt_dataset(memory, shape), adapt_dataset(test, shape)
    bank = extract_features(encoder, memory.images, batch_size=batch_size, device=device)
    query = extract_features(encoder, test.images, batch_size=batch_size, device=device)
    k = min(k, len(bank))
    correct = 0
    classes = max(memory.num_classes, int(memory.labels.max()) + 1)
    for start in range(0, len(query), 1024):
        sim = query[start:start + 1024] @ bank.t()
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, memory.labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == test.labels[start:start + 1024]).sum())
    return correct / max(len(query), 1)
