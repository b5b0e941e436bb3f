"""Batched image augmentation for every job, each random draw from an explicit generator.

One package for the supervised recipe (:class:`Augment`: pad-crop + flip), the data-free
transforms (CMI's local views, DeepInversion's jitter, CutMix, single-image patches) and SimCLR's
views (:class:`SimCLRAugment`). Every function takes the :class:`torch.Generator` (and, for
host-side scalars, the :class:`random.Random`) it draws from; none reads the global RNG, so a run
that checkpoints its generators resumes bit-exactly. Tensors are ``N×C×H×W``; see each function
for dtypes and value ranges.
"""

from .color import LUMA, bcs_jitter, color_jitter, grayscale, hsv_to_rgb, random_grayscale, rgb_to_hsv
from .geometric import crop_boxes, jitter_flip, random_resized_crop, resized_crop
from .mix import cutmix
from .patches import fit_images, single_image_patches
from .simclr import SimCLRAugment
from .standard import Augment, random_crop, random_hflip

__all__ = [
    "Augment", "LUMA", "SimCLRAugment", "bcs_jitter", "color_jitter", "crop_boxes", "cutmix", "fit_images",
    "grayscale", "hsv_to_rgb", "jitter_flip", "random_crop", "random_grayscale", "random_hflip",
    "random_resized_crop", "resized_crop", "rgb_to_hsv", "single_image_patches",
]
