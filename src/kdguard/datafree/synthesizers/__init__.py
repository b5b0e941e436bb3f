"""Synthesizers: ``synthesize()`` (one round of optimisation → named losses) and ``sample(n)``.

* :class:`Synthesizer`: the interface, RNG state and the ``generator_regularizers`` hook.
* :class:`GeneratorSynthesizer`: ZSKT, DFAD, DAFL (persistent adversarial generator).
* :class:`DeepInversionSynthesizer`: DeepInversion / Adaptive DeepInversion (pixel optimisation).
* :class:`CMISynthesizer`: CMI (re-initialised generator, contrastive loss, image pool).
* :class:`ProxySynthesizer`: OOD proxy data (another data set or patches of one image).
"""

from .adversarial import (DAFLGeneratorLoss, DFADGeneratorLoss, GeneratorLoss, GeneratorSynthesizer,
                          Observation, ZSKTGeneratorLoss)
from .base import GeneratorRegularizer, Synthesizer
from .contrastive import CMISynthesizer, ProjectionHead
from .inversion import DeepInversionSynthesizer
from .proxy import ProxySynthesizer, default_proxy_image, read_image

__all__ = ["CMISynthesizer", "DAFLGeneratorLoss", "DFADGeneratorLoss", "DeepInversionSynthesizer",
           "GeneratorLoss", "GeneratorRegularizer", "GeneratorSynthesizer", "Observation",
           "ProjectionHead", "ProxySynthesizer", "Synthesizer", "ZSKTGeneratorLoss",
           "default_proxy_image", "read_image"]
