"""A small name → object registry used for datasets, triggers, models and KD methods.

Example::

    MODELS = Registry("model")

    @MODELS.register("resnet20", family="resnet_cifar")
    def resnet20(**kw): ...

    MODELS.get("resnet20")          # the function
    MODELS.meta("resnet20")         # {"family": "resnet_cifar"}

Lookups of unknown names raise :class:`kdguard.errors.KDGuardError` listing the valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import KDGuardError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (case-insensitive, ``-`` and ``_`` equivalent) to objects plus metadata."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._aliases: dict[str, str] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def register(self, name: str, *, aliases: tuple[str, ...] = (), **meta: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (and ``aliases``) with metadata ``meta``."""

        def deco(obj: T) -> T:
            self.add(name, obj, aliases=aliases, **meta)
            return obj

        return deco

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = (), **meta: Any) -> None:
        key = self._key(name)
        if key in self._items or key in self._aliases:
            raise KDGuardError(f"{self.kind} {name!r} is registered twice", "pick another name")
        self._items[key] = obj
        self._meta[key] = dict(meta)
        for alias in aliases:
            self._aliases[self._key(alias)] = key

    def resolve(self, name: str) -> str:
        """Return the canonical name for ``name`` or raise :class:`KDGuardError`."""
        key = self._key(name)
        key = self._aliases.get(key, key)
        if key not in self._items:
            raise unknown_name(self.kind, name, self._items)
        return key

    def get(self, name: str) -> T:
        return self._items[self.resolve(name)]

    def meta(self, name: str) -> dict[str, Any]:
        return self._meta[self.resolve(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = self._key(name)
        return key in self._items or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
