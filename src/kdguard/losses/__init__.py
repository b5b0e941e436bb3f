"""Distillation losses as pure functions of tensors (logits or features).

Every function documents its input shapes, reduction and source (paper and equation). None of
them touches a model: features come from :class:`kdguard.taps.FeatureTaps`, and learnable parts
(connectors, attention MLPs, CRD embeddings and memory) live in :mod:`kdguard.distill.terms`.

=========  ========================================================  ===========================
module     loss                                                      source
=========  ========================================================  ===========================
logit      :func:`kd_loss`, :func:`kl_divergence`                    Hinton et al. 2015
dkd        :func:`dkd_loss`, :func:`dkd_parts`                       Zhao et al., CVPR 2022
fitnet     :func:`hint_loss`                                         Romero et al., ICLR 2015
attention  :func:`attention_loss`, :func:`attention_map` + presets   Zagoruyko & Komodakis 2017
sp         :func:`sp_loss`                                           Tung & Mori, ICCV 2019
rkd        :func:`rkd_loss`, distance and angle parts                Park et al., CVPR 2019
pkt        :func:`pkt_loss`                                          Passalis & Tefas, ECCV 2018
cc         :func:`cc_loss` (kernel), :func:`correlation_loss`        Peng et al., ICCV 2019;
                                                                     RepDistiller
nst        :func:`nst_loss`                                          Huang & Wang 2017
afd        :func:`afd_loss`                                          Wang et al. ICLR 2020 via
                                                                     KD-Zoo / paper 1's code
ofd        :func:`ofd_partial_l2`, :func:`ofd_margin`                Heo et al., ICCV 2019
crd        :func:`crd_nce_loss`, :func:`contrast_scores`             Tian et al., ICLR 2020
=========  ========================================================  ===========================
"""

from .afd import afd_loss, normalize_channel_attention, spatial_normalize
from .attention import (AT_VARIANTS, at_nad, at_paper, at_zagoruyko, attention_distance,
                        attention_loss, attention_map)
from .cc import cc_loss, correlation_loss, correlation_matrix
from .crd import contrast_scores, crd_nce_loss
from .dkd import dkd_loss, dkd_parts
from .fitnet import hint_loss
from .logit import kd_loss, kl_divergence
from .nst import nst_loss, poly_kernel
from .ofd import ofd_margin, ofd_partial_l2
from .pkt import cosine_conditionals, pkt_loss
from .rkd import angle_matrix, pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss
from .sp import similarity_matrix, sp_loss

__all__ = [
    "AT_VARIANTS", "afd_loss", "angle_matrix", "at_nad", "at_paper", "at_zagoruyko",
    "attention_distance", "attention_loss", "attention_map", "cc_loss", "contrast_scores",
    "correlation_loss", "correlation_matrix", "cosine_conditionals", "crd_nce_loss", "dkd_loss",
    "dkd_parts", "hint_loss", "kd_loss", "kl_divergence", "normalize_channel_attention", "nst_loss",
    "ofd_margin", "ofd_partial_l2", "pairwise_distances", "pkt_loss", "poly_kernel",
    "rkd_angle_loss", "rkd_distance_loss", "rkd_loss", "similarity_matrix", "sp_loss",
    "spatial_normalize",
]
