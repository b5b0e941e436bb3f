"""Reading a trigger's pattern or mask from a user's file, as data only.

PNG/JPEG files are decoded with Pillow; ``.npy`` files with ``np.load(allow_pickle=False)``, so
an array file can never run code. The file is read once: its sha256 and its decoded array come
from the same bytes, so a recorded digest always describes the array the trigger used.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import KDGuardError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy",)
# A trigger for images of a few hundred pixels a side is far smaller; this only stops a wrong
# path (a dataset archive, a video) from being read into memory.
MAX_FILE_BYTES = 64 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TriggerFile:
    """A decoded pattern or mask file.

    Attributes:
        path: the absolute path that was read.
        sha256: hex digest of the file's bytes.
        array: ``float32`` ``H×W×C`` (``C`` ≥ 1, channels last) with values in [0, 1].
    """

    path: str
    sha256: str
    array: np.ndarray


def check_sha256(owner: str, key: str, value: object) -> str | None:
    """``value`` (a recorded digest) as 64 lowercase hex characters, or None when not given."""
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.match(value.strip().lower()):
        raise KDGuardError(f"{owner} {key} {value!r} is not a sha256 digest (64 hex characters)",
                           f"remove attack.params.{key} to accept the file as it is now")
    return value.strip().lower()


def read_trigger_file(owner: str, key: str, path: object, *, mask: bool, channels: int = 3,
                      expected_sha256: str | None = None) -> TriggerFile:
    """Read ``path`` (given as ``attack.params.<key>``) into a float ``H×W×C`` array in [0, 1].

    Formats: PNG/JPEG (8-bit grey, RGB or palette; an alpha channel is dropped), or ``.npy`` with
    shape ``H×W`` or ``H×W×C`` and dtype ``uint8`` (0–255), ``bool``, or float (0–1). For a mask
    (``mask=True``) and for 1-channel images (``channels=1``) colour images are read as grey;
    a mask's ``uint8`` array holding only 0 and 1 is read as 0/1 (on the 0–255 scale it would
    weigh at most 1/255).

    Args:
        owner: the trigger's name, for messages.
        key: the parameter naming the file (``pattern_file`` / ``mask_file``), for messages.
        path: the file.
        mask: read as a mask.
        channels: the channels of the images the trigger is for.
        expected_sha256: the digest recorded when the trigger was first built; a file whose
            digest differs is refused.

    Raises:
        KDGuardError: missing or unreadable file, unsupported format or dtype, a file that is not
            a 2-D or channels-last 3-D image, NaN/inf or values outside [0, 1], or a digest that
            differs from ``expected_sha256``.
    """
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise KDGuardError(f"{owner} {key} {path!r} is not a file path",
                           f"give attack.params.{key}=PATH (a .png, .jpg or .npy file)")
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + ARRAY_SUFFIXES:
        raise KDGuardError(f"{owner} {key} {str(p)!r} is neither a PNG/JPEG image nor a .npy array",
                           f"give attack.params.{key} a .png, .jpg/.jpeg or .npy file")
    if not p.is_file():
        raise KDGuardError(f"{owner} {key} {str(p)!r} does not exist",
                           f"check the path given as attack.params.{key}")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise KDGuardError(f"{owner} {key} {str(p)!r} holds {size / 2**20:.0f} MiB, too much for a trigger",
                           f"give attack.params.{key} a pattern of at most the image size")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise KDGuardError(f"{owner} {key} {str(p)!r} cannot be read ({err.strerror or err})",
                           f"check the file's permissions, or give another attack.params.{key}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        sha_key = key.replace("_file", "_sha256")
        raise KDGuardError(
            f"{owner} {key} {str(p)!r} changed since the trigger was recorded (sha256 "
            f"{digest[:12]}… is not the recorded {expected_sha256[:12]}…)",
            f"restore the original file, or build the trigger afresh from attack.params.{key} "
            f"without attack.params.{sha_key}")
    raw = _decode_image(owner, key, p, data, mask or channels == 1) if suffix in IMAGE_SUFFIXES else \
        _decode_array(owner, key, p, data)
    return TriggerFile(str(p.resolve()), digest, _to_unit(owner, key, p, raw, mask))


def _decode_image(owner: str, key: str, path: Path, data: bytes, grey: bool) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
                img = img.convert("L" if grey or img.mode in ("1", "L", "LA") else "RGB")
            else:
                raise KDGuardError(f"{owner} {key} {str(path)!r} is a {img.mode!r} image, not 8-bit "
                                   "grey or colour", f"save attack.params.{key} as an 8-bit PNG, or as "
                                   "a .npy array of floats in [0, 1]")
            return np.asarray(img, dtype=np.uint8)
    except KDGuardError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise KDGuardError(f"{owner} {key} {str(path)!r} is not a readable image ({type(err).__name__})",
                           f"give attack.params.{key} a valid PNG or JPEG file") from None


def _decode_array(owner: str, key: str, path: Path, data: bytes) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        what = "holds Python objects, which kdguard does not unpickle" if "pickle" in str(err) \
            else "is not a readable .npy array"
        raise KDGuardError(f"{owner} {key} {str(path)!r} {what}",
                           f"save attack.params.{key} with np.save from a uint8 or float array") from None
    except (OSError, EOFError) as err:
        raise KDGuardError(f"{owner} {key} {str(path)!r} is not a readable .npy array ({type(err).__name__})",
                           f"save attack.params.{key} with np.save from a uint8 or float array") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive read through a .npy name
        raise KDGuardError(f"{owner} {key} {str(path)!r} is an archive, not one array",
                           f"save attack.params.{key} with np.save (not np.savez)")
    return arr


def _to_unit(owner: str, key: str, path: Path, arr: np.ndarray, mask: bool) -> np.ndarray:
    """``arr`` (``H×W`` or ``H×W×C``) as float32 ``H×W×C`` in [0, 1]."""
    name = f"{owner} {key} {str(path)!r}"
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise KDGuardError(f"{name} has shape {arr.shape}, not H×W or H×W×C",
                           f"save attack.params.{key} as an H×W or H×W×C (channels last) array")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8:
        if mask and arr.max() <= 1:
            return arr.astype(np.float32)
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise KDGuardError(f"{name} has dtype {arr.dtype}",
                           f"save attack.params.{key} as uint8 (0-255) or float (0-1) values")
    if not np.isfinite(arr).all():
        raise KDGuardError(f"{name} holds NaN or infinite values",
                           f"give attack.params.{key} finite values in [0, 1]")
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0 or high > 1.0:
        raise KDGuardError(f"{name} holds float values in [{low:.3g}, {high:.3g}], not [0, 1]",
                           f"rescale attack.params.{key} to [0, 1] (divide 0-255 values by 255)")
    return arr.astype(np.float32)
