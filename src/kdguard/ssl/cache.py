"""Prepared models cached in run directories together with the settings that built them.

A long study builds many models (teachers, warm-up students, defended encoders). Each is saved as
an SSL checkpoint whose manifest records the settings it was built from; a later run with the same
settings loads it, an interrupted build resumes from its ``train_state.pt``, and a checkpoint built
from other settings is refused instead of being silently reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import KDGuardError
from .encoder import SSLModel, is_ssl_checkpoint, load_ssl_model, save_ssl_model


def plain_settings(value: Any) -> Any:
    """``value`` as plain JSON data (dataclasses → dicts, tuples → lists), for comparing settings."""
    return json.loads(json.dumps(value, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and values): identifies exact weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cached_model(directory: Path, settings: dict[str, Any], build: Callable[[Path], SSLModel],
                 role: str) -> SSLModel:
    """Load the SSL model saved in ``directory`` if it was built with ``settings``; else build and save it.

    ``build(directory)`` trains in that directory (so an interrupted build resumes). A saved model
    whose recorded settings differ raises instead of being silently reused.

    Raises:
        KDGuardError: the directory holds a model built with other settings.
    """
    settings = plain_settings(settings)
    if is_ssl_checkpoint(directory):
        model, manifest = load_ssl_model(directory)
        if manifest.get("settings") != settings:
            raise KDGuardError(f"{str(directory)!r} holds a {role} built with other settings",
                               "use a fresh output directory, or delete that folder to rebuild it")
        return model
    directory.mkdir(parents=True, exist_ok=True)
    model = build(directory)
    save_ssl_model(directory, model, {"role": role, "settings": settings})
    return model
