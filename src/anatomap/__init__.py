"""anatomap: self-supervised learning of anatomical position from image geometry.

The public API (each a counterpart of a CLI command) is imported lazily so that
``import anatomap.geometry`` stays light::

    anatomap.index / write_manifest / read_manifest     anatomap data index
    anatomap.cache / open_cache                         anatomap data cache
    anatomap.load_config / pretrain                     anatomap pretrain
    anatomap.evaluate                                   anatomap evaluate
    anatomap.embed / match (-> Matches)                 anatomap embed / match
    anatomap.workflows.demo                                   anatomap demo
    anatomap.read_volume, load_checkpoint, build_encoder, LocatedViewDataset, ViewSpec
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "index": "anatomap.api",
    "cache": "anatomap.api",
    "pretrain": "anatomap.api",
    "evaluate": "anatomap.api",
    "load_config": "anatomap.api",
    "open_cache": "anatomap.api",
    "config_path": "anatomap.api",
    "run_demo": "anatomap.workflows.demo",
    "embed": "anatomap.api",
    "match": "anatomap.api",
    "Matches": "anatomap.infer.matches",
    "write_manifest": "anatomap.data.manifest",
    "read_manifest": "anatomap.data.manifest",
    "read_volume": "anatomap.io",
    "write_volume": "anatomap.io",
    "Volume": "anatomap.data.volume",
    "Cache": "anatomap.data.cache",
    "ViewSpec": "anatomap.data.sampler",
    "LocatedViewDataset": "anatomap.data.sampler",
    "sample_views": "anatomap.data.sampler",
    "build_encoder": "anatomap.models.encoders",
    "EncoderSpec": "anatomap.models.encoders",
    "load_checkpoint": "anatomap.checkpoint",
    "build_demo": "anatomap.data.demo",
    "transfer_into": "anatomap.infer.export",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anatomap' has no attribute {name!r}")
