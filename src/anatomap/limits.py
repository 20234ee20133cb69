"""Every resource limit anatomap enforces on its inputs, decided once (docs/reliability.md).

Readers, the config loader, checkpoints and points files check these before they allocate.
The two volume limits can be raised for a large scanner archive with the environment
variables ``ANATOMAP_MAX_VOXELS`` and ``ANATOMAP_MAX_BYTES`` (read at import); tests patch
the module attributes. Callers read them as ``limits.MAX_VOXELS`` at call time.
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(float(raw)) if raw else default
    except ValueError:
        return default
    return value if value > 0 else default


MAX_VOXELS = _env_int("ANATOMAP_MAX_VOXELS", 1 << 29)
"""Values per volume (voxels x channels x 4th-axis volumes): 536,870,912, e.g. 512x512x2048.
Reading costs about 20 bytes per value, so this bounds one scan at ~10 GB of memory."""

MAX_BYTES = _env_int("ANATOMAP_MAX_BYTES", 1 << 32)
"""Bytes of voxel data per file once decompressed (4 GiB), checked from the header."""

MAX_COMPRESSION_RATIO = 1100
"""Deflate cannot compress better than ~1032:1: a header asking for more voxel bytes than
this times the compressed size (plus 1 MiB) is corrupt or a decompression bomb."""

MAX_HEADER_BYTES = 1 << 20
"""Bytes of a MetaImage / NRRD text header read to find the files it names."""

MAX_DATA_FILES = 65536
"""Files one MetaImage / NRRD header may name (LIST or a numbered pattern)."""

MAX_CONFIG_BYTES = 1 << 20
"""Bytes of one YAML config file (1 MiB)."""

MAX_CONFIG_NODES = 100_000
"""YAML nodes of one config once every alias is expanded: a 640-byte alias bomb (billion
laughs) expands to ~10^9 and is refused before anything walks it."""

MAX_CONFIG_DEPTH = 64
"""Nesting depth of a YAML config (sections, lists, mappings)."""

MAX_META_BYTES = 16 << 20
"""Bytes of a checkpoint's ``meta.json`` (16 MiB)."""

MAX_POINTS_FILE_BYTES = 64 << 20
"""Bytes of one points CSV given to ``match`` (64 MiB, over a million points)."""

MAX_WINDOW = 512
"""Largest sliding-window edge of ``embed`` (voxels; a window is allocated whole)."""
