"""The Python API: one function per CLI command, usable from a notebook.

>>> import anatomap as am
>>> result = am.index("scans/")                     # anatomap data index
>>> am.write_manifest(result, "manifest.jsonl")
>>> am.cache("manifest.jsonl", "cache/", preset="mri", spacing=1.5)   # anatomap data cache
>>> cfg = am.load_config("isimed", ["data.cache=cache/", "output=runs/isimed"])
>>> run = am.pretrain(cfg)                           # anatomap pretrain
>>> am.evaluate(run.run_dir).metrics                 # anatomap evaluate
>>> am.embed("runs/sam", ["a.nii.gz"], out="emb/")   # anatomap embed
>>> am.match("runs/sam", "a.nii.gz", "points.csv", ["b.nii.gz"])   # anatomap match
"""

from __future__ import annotations

import csv
import io as _io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomap import geometry
from anatomap.config import RunConfig, config_path
from anatomap.config import load_config as _load_config
from anatomap.data.cache import Cache, CacheBuildResult, build_cache
from anatomap.data.manifest import IndexResult, index_directory
from anatomap.errors import AnatomapError
from anatomap.eval.evaluate import EvalResult
from anatomap.eval.evaluate import evaluate as _evaluate
from anatomap.infer.calibration import probability
from anatomap.infer.embed import DenseEmbedding, DenseModel, embedding_names, load_or_embed
from anatomap.infer.match import DEFAULT_LOW_SCORE, match_points, read_points
from anatomap.io.atomic import atomic_write_json, atomic_write_text
from anatomap.train.pretrain import PretrainResult
from anatomap.train.pretrain import pretrain as _pretrain


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML config (file or packaged name) with ``key=value`` overrides.

    ``config_path`` (re-exported here) resolves packaged names; the validation, the method's
    own parameters included, happens once, in :func:`anatomap.config.load_config`.
    """
    return _load_config(config_path(name_or_path), overrides)


def index(root: str | Path, **kwargs) -> IndexResult:
    """Find and validate every scan under ``root`` (see :func:`index_directory`)."""
    return index_directory(root, **kwargs)


def cache(manifest, out: str | Path, **kwargs) -> CacheBuildResult:
    """Preprocess a manifest into a memory-mapped cache (see :func:`build_cache`)."""
    return build_cache(manifest, out, **kwargs)


def pretrain(cfg: RunConfig | str | Path, **kwargs) -> PretrainResult:
    """Train a config (object, file or packaged name)."""
    if not isinstance(cfg, RunConfig):
        path = config_path(cfg)
        kwargs.setdefault("config_dir", path.parent)
        cfg = _load_config(path)
    return _pretrain(cfg, **kwargs)


def evaluate(run_or_checkpoint: str | Path, **kwargs) -> EvalResult:
    """Evaluate a run folder or checkpoint (see :func:`anatomap.eval.evaluate.evaluate`)."""
    return _evaluate(run_or_checkpoint, **kwargs)


def open_cache(path: str | Path) -> Cache:
    return Cache(path)


# -- inference: anatomap embed / anatomap match ------------------------------------------


def _model(checkpoint: str | Path | DenseModel) -> DenseModel:
    return (
        checkpoint if isinstance(checkpoint, DenseModel) else DenseModel.from_checkpoint(checkpoint)
    )


def embed(
    checkpoint: str | Path | DenseModel,
    volumes: Sequence[str | Path],
    out: str | Path | None = None,
    **kwargs: Any,
) -> list[DenseEmbedding]:
    """Dense embeddings of scans; with ``out``, saved there as ``<name>.emb.safetensors``
    (names that cannot collide: :func:`~anatomap.infer.embed.embedding_names`)."""
    model = _model(checkpoint)
    names = embedding_names(volumes)
    result = []
    for path, name in zip(volumes, names, strict=True):
        emb = load_or_embed(model, path, **kwargs)
        if out is not None:
            emb.save(Path(out) / name)
        result.append(emb)
    return result


def _template_world(template: str | Path, emb: DenseEmbedding, coords: np.ndarray) -> np.ndarray:
    """Voxel indices of the template *file* -> world mm (through that file's own affine)."""
    from anatomap.io import read_volume

    source = Path(emb.source) if emb.source else Path(template)
    if source.exists() and not source.name.endswith(".emb.safetensors"):
        affine = read_volume(source).affine
    elif emb.image_affine is not None:
        affine = emb.image_affine  # the preprocessed grid the embedding was made on
    else:
        raise AnatomapError(f"{template}: cannot convert voxel indices (no image affine)")
    return geometry.voxel_to_world(affine, coords)


def match(
    checkpoint: str | Path | DenseModel,
    template: str | Path,
    points: str | Path | np.ndarray,
    targets: Sequence[str | Path],
    *,
    voxel: bool = False,
    names: Sequence[str] | None = None,
    low_score: float = DEFAULT_LOW_SCORE,
    out: str | Path | None = None,
    coords: str = "RAS",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Find each template point (world mm, or voxel indices with ``voxel=True``) in every
    target. Scans or saved embeddings are accepted for template and targets. ``points`` is a
    CSV, a Slicer ``.mrk.json`` / ``.fcsv`` or an ``[N, 3]`` array; ``coords`` ("RAS" or
    "LPS") is the frame of a CSV's or an array's world mm (Slicer files state their own).
    Returns one row per (target, point), with the match in RAS mm and as continuous voxel
    indices ``i, j, k`` of the target file (of the grid an embedding was made on); with
    ``out`` also writes ``out`` (CSV) and ``out`` + ``.json``, or Slicer markups when ``out``
    ends with ``.mrk.json``."""
    from anatomap.infer.points import grid_affine, to_ras, voxel_indices, write_match_markups

    model = _model(checkpoint)
    t_emb = load_or_embed(model, template, **kwargs)
    if isinstance(points, str | Path):
        names, coords_in = read_points(points, voxel=voxel, coords=coords)
    else:
        coords_in = np.asarray(points, np.float64).reshape(-1, 3)
        coords_in = coords_in if voxel else to_ras(coords_in, coords)
        names = list(names) if names is not None else [f"p{i}" for i in range(len(coords_in))]
    world = _template_world(template, t_emb, coords_in) if voxel else coords_in
    rows: list[dict[str, Any]] = []
    calibration = model.ckpt.meta.get("calibration") if model.ckpt is not None else None
    for target in targets:
        emb = load_or_embed(model, target, **kwargs)
        res = match_points(t_emb, world, emb)
        # A calibrated model (shipped ones) flags P(error <= 5 mm) < 0.5; else score < low_score.
        prob = probability(calibration, res.scores) if calibration else None
        low = prob < 0.5 if prob is not None else res.scores < low_score
        at = voxel_indices(grid_affine(target, emb), res.points_mm).round(2)
        ijk = [[None if np.isnan(v) else float(v) for v in row] for row in at]
        for n, name in enumerate(names):
            rows.append(
                {
                    "target": str(target),
                    "name": name,
                    "template_x": round(float(world[n, 0]), 3),
                    "template_y": round(float(world[n, 1]), 3),
                    "template_z": round(float(world[n, 2]), 3),
                    "x": round(float(res.points_mm[n, 0]), 3),
                    "y": round(float(res.points_mm[n, 1]), 3),
                    "z": round(float(res.points_mm[n, 2]), 3),
                    "i": ijk[n][0],
                    "j": ijk[n][1],
                    "k": ijk[n][2],
                    "score": round(float(res.scores[n]), 4),
                    "low_confidence": bool(low[n]),
                }
            )
            if prob is not None:
                rows[-1]["p_within_5mm"] = round(float(prob[n]), 3)
    if out is not None and str(out).lower().endswith(".mrk.json"):
        write_match_markups(out, rows)
    elif out is not None:
        out = Path(out)
        buf = _io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out, buf.getvalue(), what="matches")
        atomic_write_json(out.with_name(out.name + ".json"), rows, what="matches")
    return rows
