"""A bounded pool of open memory maps, least recently used closed first.

Every open ``np.load(..., mmap_mode="r")`` holds a file descriptor (Python's ``mmap`` keeps a
duplicate of it) until the array is freed. A cache of thousands of subjects read through
maps that stay open would exhaust the process's descriptor limit (often 1024, sometimes 256)
in every DataLoader worker; :class:`MapPool` keeps at most ``capacity`` of them open and lets
the least recently used go (it closes once no view of it is alive).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

MAX_CAPACITY = 512


def default_capacity() -> int:
    """A quarter of the soft open-files limit, between 8 and :data:`MAX_CAPACITY`."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 64
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_CAPACITY
    return max(8, min(MAX_CAPACITY, soft // 4))


class MapPool:
    """``get(path)`` returns a read-only memory map of an ``.npy`` file, opening it on first
    use and keeping at most ``capacity`` open (thread-safe)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = max(1, capacity or default_capacity())
        self._maps: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> np.ndarray:
        with self._lock:
            arr = self._maps.get(path)
            if arr is not None:
                self._maps.move_to_end(path)
                return arr
        arr = np.load(path, mmap_mode="r")
        with self._lock:
            self._maps[path] = arr
            self._maps.move_to_end(path)
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
        return arr

    def __len__(self) -> int:
        return len(self._maps)

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()
