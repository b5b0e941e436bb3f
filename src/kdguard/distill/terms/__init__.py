"""Distillation terms: ``nn.Module`` s with one interface that own each method's learnable parts.

``term(s_feats, t_feats, *, s_logits, t_logits, y, index=None) -> scalar``; see
:class:`DistillTerm`. Pure loss functions are in :mod:`kdguard.losses`.
"""

from .base import DistillTerm, check_pairs
from .connectors import Connector, connectors_for
from .crd import ContrastMemory, CRDTerm
from .feature import AFDTerm, ATTerm, ChannelAttention, FitNetTerm, NSTTerm, SPTerm
from .logit import DKDTerm, KDTerm
from .ofd import OFDTerm, teacher_margins
from .relation import CCTerm, CorrelationTerm, Embed, PKTTerm, RKDTerm

__all__ = [
    "AFDTerm", "ATTerm", "CCTerm", "CRDTerm", "ChannelAttention", "Connector", "ContrastMemory",
    "CorrelationTerm", "DKDTerm", "DistillTerm", "Embed", "FitNetTerm", "KDTerm", "NSTTerm",
    "OFDTerm", "PKTTerm", "RKDTerm", "SPTerm", "check_pairs", "connectors_for", "teacher_margins",
]
