"""CRD term: Tian et al., "Contrastive Representation Distillation" (ICLR 2020).

Learnable parts: two :class:`Embed` heads (student and teacher penultimate features → 128-d unit
vectors) and a :class:`ContrastMemory` holding one student and one teacher embedding per
training sample, indexed by dataset position. Pure loss: :mod:`kdguard.losses.crd`.
Defaults follow the paper and RepDistiller: K = 16384 negatives, τ = 0.07, momentum 0.5,
128-d embeddings, weight 0.8 (CIFAR-100; KD-Zoo uses 0.2 on CIFAR-10).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import KDGuardError
from ...losses.crd import contrast_scores, crd_nce_loss
from .base import DistillTerm, check_pairs, per_sample_shapes
from .relation import Embed, flat_dims


class ContrastMemory(nn.Module):
    """Memory bank of student and teacher embeddings over the dataset (CRD, §3.3 / Eq. 19–20).

    Args:
        dim: embedding size D.
        n_data: dataset size N (rows of each bank).
        nce_k: negatives K per anchor; capped at ``N − 1`` (drawing more than there are samples
            only repeats rows and makes ``K/N > 1``).
        temperature: τ of the critic (0.07).
        momentum: the banks are updated as ``normalize(m · old + (1 − m) · new)`` (0.5).
        labels: optional ``N`` int64 dataset labels. If given, negatives are drawn only from
            other classes (RepDistiller's default ``mode='exact'`` for CIFAR-100); else uniformly
            from all indices with replacement (the paper's instance-level sampling).

    Buffers (saved with the distiller): ``memory_s``, ``memory_t`` (``N×D``, initialised uniform
    in ±1/sqrt(D/3) as in the reference), ``z_s``, ``z_t`` (normalisation constants Z, set from the
    first training batch as ``mean(exp(score/τ)) · N``; −1 until then).
    """

    def __init__(self, dim: int, n_data: int, *, nce_k: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, labels: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(n_data, int) or n_data < 2:
            raise KDGuardError(f"CRD dataset_size {n_data!r} must be an integer >= 2",
                               "pass the number of training samples, e.g. "
                               "CRDTerm(..., dataset_size=len(train_set))")
        if not isinstance(nce_k, int) or nce_k < 1:
            raise KDGuardError(f"CRD nce_k {nce_k!r} must be an integer >= 1", "use 16384 (paper)")
        if temperature <= 0 or not 0 <= momentum < 1:
            raise KDGuardError(f"CRD temperature {temperature!r} / momentum {momentum!r} out of range",
                               "use temperature > 0 (0.07) and momentum in [0, 1) (0.5)")
        self.n_data, self.k = n_data, min(nce_k, n_data - 1)
        self.temperature, self.momentum = float(temperature), float(momentum)
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n_data, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.exact = labels is not None
        if labels is not None:
            self._init_class_sampling(labels)

    def _init_class_sampling(self, labels: torch.Tensor) -> None:
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() != self.n_data:
            raise KDGuardError(f"CRD got {labels.numel()} labels for dataset_size {self.n_data}",
                               "pass one label per training sample")
        order = torch.argsort(labels, stable=True)
        classes = int(labels.max()) + 1
        count = torch.bincount(labels, minlength=classes)
        if int(count.max()) >= self.n_data:
            raise KDGuardError("CRD class-exclusive negatives need at least two classes",
                               "omit dataset_labels to sample negatives uniformly")
        self.register_buffer("labels", labels)
        self.register_buffer("sorted_idx", order)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count)
        self.register_buffer("class_count", count)

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """``B×(K+1)`` dataset indices: the anchor's own index, then K negatives."""
        b = index.shape[0]
        if not self.exact:
            neg = torch.randint(0, self.n_data, (b, self.k), device=index.device)
        else:
            c = self.labels[index]
            start, count = self.class_start[c][:, None], self.class_count[c][:, None]
            r = (torch.rand(b, self.k, device=index.device) * (self.n_data - count)).long()
            r = torch.minimum(r, self.n_data - count - 1)  # guard the rare rounding to the top
            neg = self.sorted_idx[r + (r >= start) * count]  # skip the anchor's class block
        return torch.cat([index[:, None], neg], dim=1)

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Critic scores of both anchors; updates the banks afterwards.

        Args:
            v_s, v_t: unit-norm student/teacher embeddings ``B×D``.
            index: ``B`` int64 dataset indices in ``[0, N)``.

        Returns:
            ``(scores_s, scores_t)``, each ``B×(K+1)``: student anchors against the teacher bank,
            teacher anchors against the student bank, divided by Z.
        """
        idx = self.sample(index)
        rows_t = self.memory_t[idx].detach()
        rows_s = self.memory_s[idx].detach()
        out_s = contrast_scores(v_s.float(), rows_t, self.temperature)
        out_t = contrast_scores(v_t.float(), rows_s, self.temperature)
        with torch.no_grad():
            # Z is fixed on the first batch; torch.where avoids a host sync on later steps.
            self.z_s.copy_(torch.where(self.z_s > 0, self.z_s, out_s.mean() * self.n_data))
            self.z_t.copy_(torch.where(self.z_t > 0, self.z_t, out_t.mean() * self.n_data))
            self._update(self.memory_s, index, v_s)
            self._update(self.memory_t, index, v_t)
        return out_s / self.z_s, out_t / self.z_t

    def _update(self, bank: torch.Tensor, index: torch.Tensor, v: torch.Tensor) -> None:
        mixed = bank[index] * self.momentum + v.detach().float() * (1.0 - self.momentum)
        bank.index_copy_(0, index, F.normalize(mixed, p=2.0, dim=1))


class CRDTerm(DistillTerm):
    """Contrastive representation distillation on one (student, teacher) embedding pair.

    Loss = NCE(student anchors vs teacher memory) + NCE(teacher anchors vs student memory)
    (Tian et al. 2020, Eq. 18; the reference sums both). Needs the dataset indices of the batch:
    call the distiller as ``distiller(x, y, index)``.

    Args:
        s_shapes, t_shapes: per-sample shapes of the one feature pair (flattened for the embeds).
        dataset_size: number of training samples N (size of the memory banks).
        embed_dim, nce_k, temperature, momentum, dataset_labels: see :class:`ContrastMemory`.
    """

    needs_index = True

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]], *,
                 dataset_size: int, embed_dim: int = 128, nce_k: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5, dataset_labels: torch.Tensor | None = None, **paths) -> None:
        super().__init__(**paths)
        s_dims = flat_dims(per_sample_shapes(s_shapes, "student"))
        t_dims = flat_dims(per_sample_shapes(t_shapes, "teacher"))
        if len(s_dims) != 1 or len(t_dims) != 1:
            raise KDGuardError(f"CRD distils one embedding pair, got {len(s_dims)} student and "
                               f"{len(t_dims)} teacher features", "tap one penultimate layer per model")
        self.embed_s = Embed(s_dims[0], embed_dim)
        self.embed_t = Embed(t_dims[0], embed_dim)
        self.memory = ContrastMemory(embed_dim, dataset_size, nce_k=nce_k, temperature=temperature,
                                     momentum=momentum, labels=dataset_labels)

    def forward(self, s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> torch.Tensor:
        check_pairs("CRD", s_feats, t_feats, 1)
        if index is None:
            raise KDGuardError("CRD needs the dataset indices of the batch",
                               "call the distiller as distiller(x, y, index) with index the "
                               "positions of the samples in the training set")
        if index.shape != (s_feats[0].shape[0],):
            raise KDGuardError(f"CRD index has shape {tuple(index.shape)} for a batch of "
                               f"{s_feats[0].shape[0]}", "pass one dataset index per sample")
        v_s = self.embed_s(s_feats[0].float())
        v_t = self.embed_t(t_feats[0].float())
        out_s, out_t = self.memory(v_s, v_t, index.long())
        n = self.memory.n_data
        return crd_nce_loss(out_s, n) + crd_nce_loss(out_t, n)
