"""Reading a preprocessed cache: :class:`Cache` (``cache.json``) and :class:`CachedSubject`
(one subject's memory-mapped arrays). Written by :func:`anatomap.data.cache.build_cache`;
the layout is described there and in docs/data-formats.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anatomap.data.mmaps import MapPool
from anatomap.data.records import unsafe_subject_id
from anatomap.errors import AnatomapError

CACHE_VERSION = 1


@dataclass
class CachedSubject:
    """One preprocessed subject, memory-mapped on first access."""

    root: Path
    meta: dict[str, Any]
    _image: np.ndarray | None = field(default=None, repr=False)
    _foreground: np.ndarray | None = field(default=None, repr=False)
    _pool: MapPool | None = field(default=None, repr=False)  # the cache's open maps (LRU)
    channels: int | None = field(default=None, repr=False)  # the first ones only (None: all)

    @property
    def id(self) -> str:
        return self.meta["subject"]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.meta["affine"], np.float64)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def present(self) -> np.ndarray:
        """Boolean mask over the cache's modalities: which ones this subject has."""
        return np.asarray(self.meta["present"], bool)[: self.channels]

    @property
    def image(self) -> np.ndarray:
        """``[C, *shape]`` (a memory map); the first ``channels`` when that is set."""
        if self._image is None and self._pool is not None:
            return self._pool.get(self.root / "image.npy")[: self.channels]
        if self._image is None:
            self._image = np.load(self.root / "image.npy", mmap_mode="r")
        return self._image[: self.channels]

    @property
    def foreground(self) -> np.ndarray:
        if self._foreground is None and self._pool is not None:
            return self._pool.get(self.root / "foreground.npy")
        if self._foreground is None:
            # Memory-mapped too: a loaded copy (600 KB per subject) per worker would grow
            # with the data set (benchmarks/scaling.py).
            self._foreground = np.load(self.root / "foreground.npy", mmap_mode="r")
        return self._foreground

    def label(self, name: str) -> np.ndarray:
        path = self.root / f"label_{name}.npy"
        if not path.exists():
            raise AnatomapError(f"{self.root}: subject {self.id} has no label map '{name}'")
        return self._pool.get(path) if self._pool is not None else np.load(path, mmap_mode="r")

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.get("labels", []))

    @property
    def landmarks(self) -> dict[str, np.ndarray]:
        """Named landmarks in world mm (RAS+), if the manifest had any."""
        return {k: np.asarray(v, np.float64) for k, v in self.meta.get("landmarks", {}).items()}


class Cache:
    """Read access to a cache folder written by :func:`build_cache`. Any number of processes
    may read one cache at once (nothing is written); at most ``max_open`` memory maps stay
    open per process (:class:`~anatomap.data.mmaps.MapPool`, least recently used closed).
    ``channels``: serve only the first modalities (a model trained with one modality per
    view evaluates on the first)."""

    def __init__(
        self, root: str | Path, max_open: int | None = None, channels: int | None = None
    ) -> None:
        self.root = Path(root)
        self.channels = channels
        self._pool = MapPool(max_open)
        index = self.root / "cache.json"
        if not index.is_file():
            raise AnatomapError(f"{self.root}: not an anatomap cache (no cache.json)")
        try:
            self.info = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise AnatomapError(f"{index}: damaged cache index ({exc})") from None
        if self.info.get("version") != CACHE_VERSION:
            raise AnatomapError(f"{index}: cache version {self.info.get('version')} unsupported")
        self._entries: dict[str, CachedSubject] = {}

    @property
    def subjects(self) -> list[str]:
        return list(self.info["subjects"])

    @property
    def modalities(self) -> list[str]:
        return list(self.info["modalities"])[: self.channels]

    @property
    def spacing(self) -> float | list[float] | None:
        return self.info.get("spacing")

    def __len__(self) -> int:
        return len(self.info["subjects"])

    def __contains__(self, subject: str) -> bool:
        return subject in self.info["subjects"]

    def __getitem__(self, subject: str) -> CachedSubject:
        if subject not in self._entries:
            if subject not in self.info["subjects"]:
                raise KeyError(f"subject '{subject}' is not in cache {self.root}")
            if (why := unsafe_subject_id(subject)) is not None:
                raise AnatomapError(f"{self.root / 'cache.json'}: {why}")
            folder = self.root / "subjects" / subject
            meta = json.loads((folder / "meta.json").read_text())
            self._entries[subject] = CachedSubject(
                folder, meta, _pool=self._pool, channels=self.channels
            )
        return self._entries[subject]

    def fingerprint(self) -> str:
        return str(self.info.get("fingerprint", ""))

    def __getstate__(self) -> dict:
        # Memory maps are reopened in each DataLoader worker, never pickled.
        return {
            "root": self.root,
            "info": self.info,
            "_entries": {},
            "max_open": self._pool.capacity,
        }

    def __setstate__(self, state: dict) -> None:
        self.root, self.info, self._entries = state["root"], state["info"], {}
        self._pool = MapPool(state.get("max_open"))
