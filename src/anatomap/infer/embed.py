"""Dense embeddings of whole volumes (``anatomap embed``), saved with their affines.

A sliding window whose size and steps are multiples of the model's largest stride tiles the
volume, so every window's feature voxels fall on one global grid per level (feature voxel
``o`` of a level with stride ``s`` sits at volume voxel ``s * o``, see
:func:`anatomap.geometry.feature_affine`). Overlapping windows are blended with Gaussian
weights (less weight near window borders) and the blend is re-normalised to unit length.
Memory is bounded by the output maps plus one batch of windows: a 256^3 volume at the
default 128-d heads needs about 1.1 GB for the fine map.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from anatomap import geometry
from anatomap.checkpoint import LoadedCheckpoint, load_checkpoint, load_objective
from anatomap.data.preprocess import IntensityPreset, preprocess
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError, CheckpointError
from anatomap.io import read_volume
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import DenseObjective

EMBEDDING_SUFFIX = ".emb.safetensors"


@dataclass
class DenseEmbedding:
    """Coarse and fine embedding maps ``[D, *s]`` (unit length) with their world affines."""

    coarse: torch.Tensor
    fine: torch.Tensor
    coarse_affine: np.ndarray
    fine_affine: np.ndarray
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()
    image_affine: np.ndarray | None = None

    def save(self, path: str | Path) -> Path:
        """Write ``.emb.safetensors`` (float16 maps, affines as metadata) atomically."""
        from anatomap.io.atomic import atomic_path

        path = Path(path)
        info = {
            "coarse_affine": self.coarse_affine.tolist(),
            "fine_affine": self.fine_affine.tolist(),
            "source": self.source,
            "image_shape": list(self.image_shape),
            "image_affine": None if self.image_affine is None else self.image_affine.tolist(),
            "meta": self.meta,
        }
        with atomic_path(path, what="embedding") as tmp:
            save_file(
                # float16 halves the files; unit vectors lose < 1e-3 in cosine similarity.
                # the fine map voxel-major, as match_points reads it (files of older versions,
                # with "fine" channel-first, still load)
                {
                    "coarse": self.coarse.half().contiguous(),
                    "fine_voxel_major": self.fine.half().movedim(0, -1).contiguous(),
                },
                str(tmp),
                metadata={"anatomap": json.dumps(info)},
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> DenseEmbedding:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                info = json.loads((fh.metadata() or {})["anatomap"])
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own types
            raise AnatomapError(f"{path}: not an anatomap embedding file ({exc})") from None
        img_aff = info.get("image_affine")
        coarse = tensors["coarse"].float()
        fine = (
            tensors["fine_voxel_major"].float().movedim(-1, 0)
            if "fine_voxel_major" in tensors
            else tensors["fine"].float()
        )
        if not (torch.isfinite(coarse).all() and torch.isfinite(fine).all()):
            raise AnatomapError(f"{path}: embedding holds NaN or infinite values; re-embed it")
        return cls(
            coarse,
            fine,
            np.asarray(info["coarse_affine"]),
            np.asarray(info["fine_affine"]),
            info.get("source", ""),
            info.get("meta", {}),
            tuple(info.get("image_shape", ())),
            None if img_aff is None else np.asarray(img_aff),
        )


def voxel_major(x: torch.Tensor) -> torch.Tensor:
    """``x [D, *s]`` with each voxel's D values stored together (same shape, other strides):
    :func:`~anatomap.infer.match.match_points` reads its voxel rows without copying it."""
    return x.movedim(0, -1).contiguous().movedim(-1, 0)


class DenseModel:
    """A checkpoint whose objective produces dense coarse/fine maps (SAM and its kin)."""

    def __init__(
        self, encoder: Encoder, objective: DenseObjective, ckpt: LoadedCheckpoint | None = None
    ) -> None:
        self.ckpt = ckpt
        self.encoder = encoder.eval()
        self.objective = objective.eval()
        self.strides: tuple[int, int] = tuple(objective.strides)  # (coarse, fine)
        self.max_stride = int(max(encoder.pyramid_strides))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> DenseModel:
        ckpt = load_checkpoint(path)
        objective = load_objective(ckpt)
        if not isinstance(objective, DenseObjective):
            raise CheckpointError(
                f"{ckpt.path}: trained with '{ckpt.meta['objective']}', which gives no dense "
                "per-voxel embeddings; embed/match need a dense checkpoint (e.g. sam)"
            )
        return cls(ckpt.encoder, objective, ckpt)

    @property
    def meta(self) -> dict[str, Any]:
        return self.ckpt.meta if self.ckpt is not None else {}

    @property
    def source(self) -> str:
        return str(self.ckpt.path) if self.ckpt is not None else ""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective.dense(self.encoder, images)


def check_options(
    window: Any = 64, overlap: Any = 0.25, batch_size: Any = 2, **_: Any
) -> tuple[int, float, int]:
    """Validated sliding-window options: ``window`` an integer in [1, MAX_WINDOW] voxels,
    ``overlap`` a number in [0, 1), ``batch_size`` an integer >= 1. Raises one line naming the
    option (``embed --overlap -1`` would blend windows that never meet: NaN maps)."""
    from anatomap import limits

    def integer(name: str, value: Any, hi: int) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | np.integer)
            or not 1 <= value <= hi
        ):
            raise AnatomapError(f"{name} {value!r}: must be an integer from 1 to {hi}")
        return int(value)

    try:
        ov = float(overlap)
    except (TypeError, ValueError):
        ov = math.nan
    if not 0 <= ov < 1:  # NaN fails too
        raise AnatomapError(f"overlap {overlap!r}: must be a number in [0, 1)")
    return integer("window", window, limits.MAX_WINDOW), ov, integer("batch_size", batch_size, 1024)


def _starts(n: int, window: int, step: int) -> list[int]:
    if n <= window:
        return [0]
    count = math.ceil((n - window) / step) + 1
    return [i * step for i in range(count)]


def _gaussian(size: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    return torch.exp(-0.5 * (x / max(size / 4, 1.0)) ** 2)


@torch.no_grad()
def embed_array(
    model: DenseModel,
    image: np.ndarray,
    affine: np.ndarray,
    *,
    window: int = 64,
    overlap: float = 0.25,
    batch_size: int = 2,
    device: str = "cpu",
) -> DenseEmbedding:
    """Embed a preprocessed image ``[C, X, Y, Z]`` (the model's preprocessing already applied)."""
    window, overlap, batch_size = check_options(window, overlap, batch_size)
    m = model.max_stride
    window = max(m, (window // m) * m)
    step = max(m, int(window * (1 - overlap)) // m * m)
    shape = image.shape[1:]
    starts = [_starts(n, window, step) for n in shape]
    padded = [max(window, s[-1] + window) for s in starts]
    vol = torch.zeros((image.shape[0], *padded), dtype=torch.float32)
    vol[:, : shape[0], : shape[1], : shape[2]] = torch.from_numpy(np.asarray(image, np.float32))
    outs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    boxes = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    model.encoder.to(device)
    model.objective.to(device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        x = torch.stack(
            [vol[:, a : a + window, b : b + window, c : c + window] for a, b, c in chunk]
        )
        maps = model(x.to(device))
        for level, (stride, fmap) in enumerate(zip(model.strides, maps, strict=True)):
            fmap = fmap.float().cpu()
            ws = fmap.shape[2:]
            if level not in outs:
                size = [p // stride for p in padded]
                outs[level] = (torch.zeros(fmap.shape[1], *size), torch.zeros(*size))
                weight = (
                    _gaussian(ws[0], fmap.device)[:, None, None]
                    * _gaussian(ws[1], fmap.device)[None, :, None]
                    * _gaussian(ws[2], fmap.device)[None, None, :]
                )
                outs[level] = (*outs[level], weight)  # type: ignore[assignment]
            acc, wsum, weight = outs[level]  # type: ignore[misc]
            for (a, b, c), f in zip(chunk, fmap, strict=True):
                o = (a // stride, b // stride, c // stride)
                sl = (
                    slice(o[0], o[0] + ws[0]),
                    slice(o[1], o[1] + ws[1]),
                    slice(o[2], o[2] + ws[2]),
                )
                acc[(slice(None), *sl)] += f * weight
                wsum[sl] += weight
    result = []
    for level, stride in enumerate(model.strides):
        acc, wsum, _ = outs[level]  # type: ignore[misc]
        keep = [math.ceil(n / stride) for n in shape]
        emb = acc[:, : keep[0], : keep[1], : keep[2]] / wsum[: keep[0], : keep[1], : keep[2]]
        result.append(voxel_major(F.normalize(emb, dim=0)))
    return DenseEmbedding(
        coarse=result[0],
        fine=result[1],
        coarse_affine=geometry.feature_affine(np.asarray(affine, np.float64), model.strides[0]),
        fine_affine=geometry.feature_affine(np.asarray(affine, np.float64), model.strides[1]),
        meta={"checkpoint": model.source, "code_version": model.meta.get("code_version")},
        image_shape=tuple(int(n) for n in shape),
        image_affine=np.asarray(affine, np.float64),
    )


def preprocess_for(model: DenseModel, volume: Volume) -> Volume:
    """Apply the checkpoint's recorded preprocessing (RAS+, spacing, intensity preset)."""
    data = model.meta.get("data", {})
    spacing = data.get("spacing")
    presets = data.get("preprocessing") or {}
    preset_d = (
        presets.get(volume.modality) or presets.get("*") or next(iter(presets.values()), None)
    )
    preset = IntensityPreset(**preset_d) if preset_d else None
    return preprocess(volume, spacing, preset)


def embed_file(
    model: DenseModel, path: str | Path, *, modality: str | None = None, **kwargs: Any
) -> DenseEmbedding:
    """Read a scan (any supported format), preprocess it as the model's data, embed it."""
    check_options(**kwargs)  # before the scan is read
    modalities: Sequence[str] = model.meta.get("data", {}).get("modalities") or ["image"]
    vol = preprocess_for(model, read_volume(path, modality=modality or modalities[0]))
    image = np.zeros((len(modalities), *vol.shape), np.float32)
    image[0] = vol.array  # single file -> first modality; the others stay empty (zeros)
    emb = embed_array(model, image, vol.affine, **kwargs)
    emb.source = str(path)
    return emb


def load_or_embed(model: DenseModel, path: str | Path, **kwargs: Any) -> DenseEmbedding:
    """Reuse an embedding saved by ``anatomap embed`` (``*.emb.safetensors``) or embed a scan."""
    check_options(**kwargs)
    p = Path(path)
    if p.name.endswith(EMBEDDING_SUFFIX):
        emb = DenseEmbedding.load(p)
        made_by = emb.meta.get("checkpoint")
        if made_by and Path(made_by).resolve() != Path(model.source).resolve():
            raise AnatomapError(
                f"{p}: embedded with checkpoint {made_by}, not {model.source}; re-embed it"
            )
        return emb
    return embed_file(model, p, **kwargs)


def embedding_name(path: str | Path) -> str:
    """File name of a scan's saved embedding: ``<scan name without suffix>.emb.safetensors``."""
    from anatomap.io.readers import strip_suffix

    return Path(strip_suffix(Path(path).name)).name + EMBEDDING_SUFFIX


def embedding_names(paths: Sequence[str | Path]) -> list[str]:
    """Output names for the embeddings of ``paths`` that cannot collide: the scan's name
    (:func:`embedding_name`) when the names differ, else its path relative to the scans'
    common folder (``s0001/ct.nii.gz`` -> ``s0001/ct.emb.safetensors``), with the full file
    name kept where even that repeats (``ct.nii`` beside ``ct.nii.gz``)."""
    import os

    from anatomap.io.readers import strip_suffix

    names = [embedding_name(p) for p in paths]
    absolute = [os.path.abspath(p) for p in paths]
    if len(set(names)) == len(set(absolute)):
        return names
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    rel = [os.path.relpath(a, common) for a in absolute]
    names = [str(Path(r).parent / strip_suffix(Path(r).name)) + EMBEDDING_SUFFIX for r in rel]
    if len(set(names)) != len(set(absolute)):
        names = [r + EMBEDDING_SUFFIX for r in rel]
    return [n.removeprefix("./") for n in names]
