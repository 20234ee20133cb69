"""A small name -> object registry (in the style of timm), shared by every registry of anatomap.

Encoders (:mod:`anatomap.models.encoders`), objectives (:mod:`anatomap.objectives.registry`)
and evaluation tasks (:mod:`anatomap.eval.tasks`) each hold one :class:`Registry`::

    ENCODERS = Registry("encoder")

    @ENCODERS.register("small_cnn")
    def small_cnn(spec): ...

    ENCODERS.get("small_cnn")       # unknown name: ConfigError listing the registered ones
    ENCODERS.names("swin*")         # fnmatch-style filter

A name registered twice is an error. ``builtins`` is called once, before the first lookup, to
import the modules that register the built-in entries.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Generic, TypeVar

from anatomap.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one ``kind`` (used in messages: ``"encoder"``, ``"objective"``...)."""

    def __init__(self, kind: str, builtins: Callable[[], object] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._builtins = builtins

    def _load(self) -> None:
        load, self._builtins = self._builtins, None  # once; set first: loading registers here
        if load is not None:
            try:
                load()
            except BaseException:
                self._builtins = load  # retried on the next lookup
                raise

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``; returns it unchanged."""

        def wrap(obj: T) -> T:
            self.add(name, obj)
            return obj

        return wrap

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (``ValueError`` if the name is taken)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' registered twice")
        self._entries[name] = obj

    def pop(self, name: str, default: T | None = None) -> T | None:
        """Unregister ``name`` (tests register temporary entries); ``default`` if absent."""
        return self._entries.pop(name, default)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name is a :class:`ConfigError`."""
        self._load()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; registered: {', '.join(self.names())}"
            )
        return self._entries[name]

    def items(self, filter: str | None = None) -> list[tuple[str, T]]:
        """``(name, entry)`` in registration order, names matching the fnmatch ``filter``."""
        self._load()
        return [
            (n, v) for n, v in self._entries.items() if filter is None or fnmatchcase(n, filter)
        ]

    def names(self, filter: str | None = None) -> list[str]:
        """Sorted registered names, optionally only those matching ``filter`` (``"swin*"``)."""
        return sorted(n for n, _ in self.items(filter))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __len__(self) -> int:
        self._load()
        return len(self._entries)
