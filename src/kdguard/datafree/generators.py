"""Image generators of the data-free methods: latent ``z`` → image batch in the model's input space.

Both references use the same upsampling stack (an init size of H/4, two nearest ×2 upsamplings)::

    z ─ Linear(latent, 2w·h₀·w₀) ─ view(2w, h₀, w₀) ─ BN
      ─ Up×2 ─ Conv3×3(2w→2w) ─ BN ─ LeakyReLU(0.2)
      ─ Up×2 ─ Conv3×3(2w→w)  ─ BN ─ LeakyReLU(0.2)
      ─ Conv3×3(w→C) ─ [head] ─ output mapping

* ``zskt`` (Micaelli & Storkey 2019; ABD ``zskt/models/generator.py``): latent 100, w = 64,
  convolutions with bias, head = ``BatchNorm2d(C, affine=True)``. The reference feeds that BN
  output straight to a teacher that expects *normalised* inputs.
* ``dcgan`` (CMI / Fast-Datafree ``Generator(nz=256, ngf=64)``): latent 256, w = 64, the two
  inner convolutions without bias, no head, sigmoid output (an image in [0, 1]).

kdguard models take images in ``[0, 1]`` and normalise inside, so the generator's last tensor
``h`` is mapped to the input space by ``output``:

==============  ============================================  =========================================
``sigmoid``     ``x = sigmoid(h)``                            in [0, 1] (dcgan default)
``affine``      ``x = μ + σ·h`` (dataset mean/std)            the teacher sees exactly ``h`` after its
                                                              own normalisation, as in the ZSKT
                                                              reference; unbounded (zskt default)
``affine_clamp`` ``x = clamp(μ + σ·h, 0, 1)``                 the same, clipped to valid pixels
==============  ============================================  =========================================

Sizes other than multiples of 4 are produced at ``4·ceil(H/4)`` and centre-cropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KDGuardError

#: kind → (latent_dim, conv_bias of the inner convs, BN head, default output mapping)
GENERATOR_KINDS: dict[str, tuple[int, bool, bool, str]] = {
    "zskt": (100, True, True, "affine"),
    "dcgan": (256, False, False, "sigmoid"),
}
OUTPUT_MAPPINGS = ("sigmoid", "affine", "affine_clamp")


class ConvGenerator(nn.Module):
    """The two-upsampling generator shared by ZSKT and CMI (see the module docstring).

    Args:
        latent_dim: size of ``z`` (> 0).
        image_shape: ``(C, H, W)`` of the images to produce (H, W ≥ 4).
        width: base channel count ``w`` (channels 2w, 2w, w, C).
        conv_bias: bias on the two inner convolutions.
        bn_head: end with ``BatchNorm2d(C, affine=True)`` (ZSKT).
        output: ``"sigmoid"``, ``"affine"`` or ``"affine_clamp"``.
        mean, std: per-channel dataset statistics (0–1 scale) for the affine mappings.

    Forward: ``z`` float ``N×latent_dim`` → images float ``N×C×H×W`` (range per ``output``).

    Raises:
        KDGuardError: bad sizes, unknown output mapping, or mean/std of the wrong length.
    """

    def __init__(self, latent_dim: int, image_shape: Sequence[int], *, width: int = 64,
                 conv_bias: bool = True, bn_head: bool = False, output: str = "sigmoid",
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> None:
        super().__init__()
        if len(image_shape) != 3 or min(image_shape) < 1 or min(image_shape[1:]) < 4:
            raise KDGuardError(f"generator image shape {tuple(image_shape)} is not (C, H, W) with "
                               "H, W >= 4", "pass the dataset's (C, H, W), e.g. (3, 32, 32)")
        if latent_dim < 1 or width < 1:
            raise KDGuardError(f"generator latent_dim={latent_dim}, width={width} must be >= 1",
                               "use e.g. ConvGenerator(latent_dim=100, image_shape=(3, 32, 32), width=64)")
        if output not in OUTPUT_MAPPINGS:
            raise KDGuardError(f"generator output {output!r} is not one of {', '.join(OUTPUT_MAPPINGS)}",
                               "use sigmoid (images in [0, 1]) or affine (ZSKT reference)")
        c, h, w = (int(v) for v in image_shape)
        mean_t = torch.tensor([float(v) for v in mean], dtype=torch.float32)
        std_t = torch.tensor([float(v) for v in std], dtype=torch.float32)
        if mean_t.numel() == 1:
            mean_t, std_t = mean_t.expand(c).clone(), std_t.expand(c).clone()
        if mean_t.numel() != c or std_t.numel() != c:
            raise KDGuardError(f"generator mean/std have {mean_t.numel()}/{std_t.numel()} values for "
                               f"{c} channels", f"give 1 or {c} values")
        self.latent_dim = latent_dim
        self.image_shape = (c, h, w)
        self.output = output
        self.init_size = (math.ceil(h / 4), math.ceil(w / 4))
        self.fc = nn.Linear(latent_dim, 2 * width * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.conv1 = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, width, 3, 1, 1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c, 3, 1, 1)
        self.head: nn.Module = nn.BatchNorm2d(c, affine=True) if bn_head else nn.Identity()
        self.register_buffer("mean", mean_t.view(1, c, 1, 1))
        self.register_buffer("std", std_t.view(1, c, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise KDGuardError(f"generator input has shape {tuple(z.shape)}, expected N×{self.latent_dim}",
                               "draw z with shape (batch, latent_dim)")
        x = self.fc(z).view(z.shape[0], -1, *self.init_size)
        x = self.bn0(x)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = self.head(self.conv3(x))
        x = self._crop(x)
        return self._map_output(x)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = self.image_shape
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        return x[:, :, top:top + h, left:left + w] if (top or left) else x

    def _map_output(self, h: torch.Tensor) -> torch.Tensor:
        if self.output == "sigmoid":
            return torch.sigmoid(h)
        x = self.mean.to(h.dtype) + self.std.to(h.dtype) * h
        return x.clamp(0.0, 1.0) if self.output == "affine_clamp" else x


def build_generator(kind: str, image_shape: Sequence[int], *, latent_dim: int | None = None,
                    width: int = 64, output: str = "auto", mean: Sequence[float] = (0.5,),
                    std: Sequence[float] = (0.5,)) -> ConvGenerator:
    """A :class:`ConvGenerator` of a named kind (``"zskt"`` or ``"dcgan"``).

    ``latent_dim=None`` and ``output="auto"`` take the kind's reference values (zskt: 100 and
    ``affine``; dcgan: 256 and ``sigmoid``).

    Raises:
        KDGuardError: unknown kind or a bad size/mapping.
    """
    if kind not in GENERATOR_KINDS:
        raise KDGuardError(f"generator kind {kind!r} is not one of {', '.join(GENERATOR_KINDS)}",
                           "use generator.kind=zskt or generator.kind=dcgan")
    ref_latent, conv_bias, bn_head, ref_output = GENERATOR_KINDS[kind]
    return ConvGenerator(latent_dim or ref_latent, image_shape, width=width, conv_bias=conv_bias,
                         bn_head=bn_head, output=ref_output if output == "auto" else output,
                         mean=mean, std=std)


@torch.no_grad()
def reinitialize(module: nn.Module, rng: torch.Generator) -> None:
    """Re-draw weights the way CMI does before every synthesis round (``reset_model``).

    Conv/Linear weights ~ N(0, 0.02²) and zero biases; BatchNorm weights ~ N(1, 0.02²) and zero
    biases. BatchNorm running statistics are left as they are (as in the reference). ``rng``
    must live on the parameters' device.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            m.weight.normal_(0.0, 0.02, generator=rng)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            m.weight.normal_(1.0, 0.02, generator=rng)
            m.bias.zero_()
