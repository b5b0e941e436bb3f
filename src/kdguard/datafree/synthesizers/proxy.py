"""OOD proxy-data KD: distil on unlabeled images that are not the teacher's data.

ABD's OOD baseline (``cmi/vanilla_kd_ood.py``) distils on 50,000 patches cut from a single image
(Asano & Saeed, "Extrapolating from a Single Image to a Thousand Classes using Distillation",
ICLR 2023), with random flip, random crop (pad 4) and CutMix (β = 0.25, probability 1) on every
batch, and the loss KL(T^8 ‖ S^8). kdguard offers the same with either source:

* ``source="image"``: patches of one image file (:func:`read_image`,
  :func:`~kdguard.augment.single_image_patches`); the default image is the photograph
  ``grace_hopper.jpg`` that matplotlib ships;
* ``source="dataset"``: the training split of another registered data set (e.g. GTSRB for a
  CIFAR-10 teacher), resized and channel-converted to the teacher's input (labels unused).

Nothing is optimised: ``synthesize()`` returns no losses. The pool is fixed and rebuilt
deterministically from the seed on resume (only its shuffling position is checkpointed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ...augment import Augment, cutmix
from ...errors import KDGuardError
from ..pool import ImagePool
from .base import Synthesizer


def default_proxy_image() -> Path:
    """Path of ``grace_hopper.jpg`` in matplotlib's sample data (a 512×600 RGB photograph).

    Raises:
        KDGuardError: matplotlib's sample data are not installed.
    """
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.exists():
        raise KDGuardError(f"matplotlib's sample image {str(path)!r} is missing",
                           "set ood.image to an image file of your own")
    return path


def read_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """Read an image file as ``uint8`` ``C×H×W`` (``channels`` 3 = RGB, 1 = grayscale).

    Raises:
        KDGuardError: the file does not exist or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise KDGuardError(f"proxy image {str(path)!r} does not exist", "set ood.image to an image file")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise KDGuardError(f"cannot decode proxy image {str(path)!r} ({type(e).__name__})",
                           "give a PNG or JPEG file") from None
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ProxySynthesizer(Synthesizer):
    """A fixed pool of proxy images served with flip, crop and CutMix (see the module docstring).

    Args:
        teacher, student: the models (only stored; nothing is optimised).
        images: ``uint8`` ``N×C×H×W`` proxy images of the teacher's input shape.
        cutmix_beta, cutmix_prob: CutMix parameters (ABD: 0.25, 1.0).
        augment: flip + crop (``None``: crop 4 + flip, the reference's transform).
        **kwargs: :class:`Synthesizer` arguments.

    Raises:
        KDGuardError: images of the wrong shape or an empty set.
    """

    name = "ood"

    def __init__(self, teacher: nn.Module, student: nn.Module, images: torch.Tensor, *,
                 cutmix_beta: float = 0.25, cutmix_prob: float = 1.0,
                 augment: Augment | None = None, **kwargs: Any) -> None:
        super().__init__(teacher, student, **kwargs)
        if len(images) == 0:
            raise KDGuardError("the proxy data set is empty", "give a non-empty image set")
        self.pool = ImagePool(self.image_shape, self.device)
        self.pool.add(images)
        self.cutmix_beta, self.cutmix_prob = float(cutmix_beta), float(cutmix_prob)
        self.augment = augment if augment is not None else Augment(4, hflip=True)

    def __len__(self) -> int:
        return len(self.pool)

    def synthesize(self) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        x = self.augment(self.pool.sample(n, self.rng).float().div_(255.0), generator=self.rng)
        if self.cutmix_prob > 0:
            x = cutmix(x, beta=self.cutmix_beta, prob=self.cutmix_prob, generator=self.rng,
                       host_rng=self.host_rng)
        return x

    def preview(self, n: int) -> torch.Tensor:
        return self.pool.images[:n].float().div(255.0).cpu()

    def extra_state(self) -> dict[str, Any]:
        state = self.pool.state_dict()
        state.pop("images")  # rebuilt from the seed
        return {"pool_order": state}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        order = state["pool_order"]
        self.pool.load_state_dict({"images": self.pool.images, **order})
