"""Preprocessed volume cache: one memory-mapped ``.npy`` per subject, affine kept.

Layout::

    CACHE/cache.json                     modalities, spacing, presets, subjects, version
    CACHE/subjects/<id>/image.npy        [C, X, Y, Z] (C = cache modalities; missing = zeros)
    CACHE/subjects/<id>/label_<name>.npy label maps on the same grid (nearest resampling)
    CACHE/subjects/<id>/foreground.npy   [K, 3] int32 voxel indices of foreground voxels
    CACHE/subjects/<id>/meta.json        affine, shape, modalities present, source fingerprint

``.npy`` files open with ``np.load(mmap_mode="r")``: a random crop reads only the pages it
touches, so a cache of any size serves crops with memory bounded by the page cache
(measured in ``benchmarks/cache_format.py``). Every file is written to a temporary name and
renamed; ``meta.json`` is written last, so an interrupted build leaves no entry that looks
complete, and a rebuild skips entries whose source fingerprint still matches. Subjects are
built in worker processes (``workers``), and the folder is locked while it is written.
Reading is in :mod:`anatomap.data.cache_read` (re-exported here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anatomap import limits
from anatomap.data.cache_read import CACHE_VERSION, Cache, CachedSubject
from anatomap.data.manifest import (
    SubjectRecord,
    load_landmarks,
    read_manifest,
    stat_signature,
    unsafe_subject_id,
)
from anatomap.data.parallel import Failed, run_each
from anatomap.data.preprocess import IntensityPreset, parse_presets, preprocess, preset_for
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError, VolumeError
from anatomap.io import read_volume
from anatomap.io.atomic import atomic_path, atomic_write_json
from anatomap.io.lock import folder_lock

__all__ = [  # the readers live in cache_read; importers use this module
    "CACHE_VERSION",
    "Cache",
    "CacheBuildResult",
    "CachedSubject",
    "build_cache",
]

MAX_FOREGROUND_POINTS = 50_000


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` to ``path`` atomically (the reliability tests patch this seam)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


@dataclass
class CacheBuildResult:
    cache: Cache
    problems: list[dict[str, str]]
    built: int
    reused: int


def _record_fingerprint(record: SubjectRecord, spacing: Any, presets: dict, dtype: str) -> str:
    h = hashlib.sha256()
    items = [(m, r.path) for m, r in sorted(record.images.items())]
    items += [(f"label:{n}", r.path) for n, r in sorted(record.labels.items())]
    if record.landmarks:
        items.append(("landmarks", record.landmarks))
    for key, path in items:  # a name that is not UTF-8 hashes as its bytes
        h.update(os.fsencode(f"{key}|{path}|{stat_signature(path)}"))
    h.update(json.dumps([spacing, presets, dtype, CACHE_VERSION], sort_keys=True).encode())
    if record.resampled:
        h.update(json.dumps([record.reference, record.resampled], sort_keys=True).encode())
    return h.hexdigest()[:16]


def _foreground_points(image: np.ndarray, thresholds: Sequence[float], seed: int) -> np.ndarray:
    mask = np.zeros(image.shape[1:], bool)
    for c, thr in enumerate(thresholds):
        mask |= image[c] > thr
    pts = np.argwhere(mask).astype(np.int32)
    if len(pts) > MAX_FOREGROUND_POINTS:
        rng = np.random.default_rng(seed)
        pts = pts[np.sort(rng.choice(len(pts), MAX_FOREGROUND_POINTS, replace=False))]
    return pts


def _read_3d(
    path: str,
    modality: str | None,
    subject: str,
    ndim: int,
    dtype: type | None = None,
    **picks: Any,
) -> Volume:
    """Read a scan as indexed (``picks``: the volume of a 4-D file, the series of a DICOM
    folder; ``ImageRecord.read_options``); a 2-D image becomes a one-slice volume
    ``[X, Y, 1]`` (its 4x4 affine already places slice 0), so 2-D data shares the 3-D cache
    and sampler."""
    vol = read_volume(
        path, modality=modality, subject=subject, expect_ndim=ndim, dtype=dtype, **picks
    )
    if vol.ndim == 2:
        vol.array = vol.array[..., None]
    return vol


def _onto_grid(vol: Volume, affine: np.ndarray, shape: tuple[int, ...], label: bool) -> np.ndarray:
    """``vol`` resampled onto the grid ``(affine, shape)`` (MONAI ``SpatialResample``;
    trilinear, nearest for labels, zeros outside): a modality the manifest marked for
    resampling onto the subject's reference grid."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    mt = MetaTensor(
        torch.as_tensor(np.asarray(vol.array, np.float32)[None]),
        affine=torch.as_tensor(vol.affine, dtype=torch.float64),
    )
    out = SpatialResample(mode="nearest" if label else "bilinear", padding_mode="zeros")(
        mt, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=shape
    )
    arr = np.asarray(out.array[0])
    return np.rint(arr).astype(vol.array.dtype) if label else arr.astype(np.float32)


def check_spacing(spacing: Any) -> float | None:
    """The cache's target spacing: ``None`` (keep each scan's) or a finite positive number of
    mm. Anything else (0, negative, NaN, Inf) is refused before any subject is read."""
    if spacing is None:
        return None
    try:
        value = float(spacing)
    except (TypeError, ValueError):
        raise AnatomapError(f"spacing {spacing!r}: must be a number of mm") from None
    if not np.isfinite(value) or value <= 0:
        raise AnatomapError(f"spacing {spacing!r}: must be a finite number of mm above 0")
    return value


def _check_output_size(path: str, shape: Sequence[int], src: Sequence[float], spacing: Any) -> None:
    """Refuse a resampling whose output would exceed :data:`~anatomap.limits.MAX_VOXELS`."""
    if spacing is None or not src:
        return
    n = float(
        np.prod([max(1.0, s * d / spacing) for s, d in zip(shape[:3], src[:3], strict=False)])
    )
    if n > limits.MAX_VOXELS:
        raise VolumeError(
            path,
            f"resampling to {spacing} mm would make ~{n:,.0f} voxels, more than the limit of "
            f"{limits.MAX_VOXELS:,} (ANATOMAP_MAX_VOXELS); choose a coarser --spacing",
        )


def _check_values(path: str, array: np.ndarray, dtype: str) -> None:
    """Refuse values that are not finite after preprocessing, or that the cache's dtype cannot
    hold (float16 ends at 65504: larger values would be stored as Inf)."""
    if array.size == 0:
        return
    lo, hi = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise VolumeError(path, "non-finite values after preprocessing")
    top = float(np.finfo(np.dtype(dtype)).max)
    if hi > top or lo < -top:
        raise VolumeError(
            path,
            f"values {lo:.6g} to {hi:.6g} exceed the {dtype} range of the cache (+-{top:g}); "
            "cache with --dtype float32 or an intensity preset (ct, mri)",
        )


def _build_entry(
    record: SubjectRecord,
    folder: Path,
    modalities: list[str],
    presets: dict[str, IntensityPreset],
    spacing: float | None,
    dtype: str,
    fingerprint: str,
) -> None:
    ref_affine: np.ndarray | None = None
    ref_shape: tuple[int, ...] | None = None
    channels: list[np.ndarray | None] = [None] * len(modalities)
    thresholds = [np.inf] * len(modalities)
    # the manifest's reference modality first: its grid is the subject's grid
    for c in sorted(range(len(modalities)), key=lambda c: modalities[c] != record.reference):
        m = modalities[c]
        rec = record.images.get(m)
        if rec is None:
            continue
        preset = preset_for(presets, m)
        _check_output_size(rec.path, rec.shape, rec.spacing, spacing)
        vol = preprocess(
            _read_3d(rec.path, m, record.subject, len(rec.shape), **rec.read_options()),
            spacing,
            preset,
        )
        _check_values(rec.path, vol.array, dtype)
        if ref_affine is None:
            ref_affine, ref_shape = vol.affine, vol.shape
        elif vol.shape != ref_shape or not np.allclose(vol.affine, ref_affine, atol=1e-3):
            if m not in record.resampled:
                raise VolumeError(rec.path, "grid differs from the subject's first modality")
            vol.array = _onto_grid(vol, ref_affine, ref_shape, label=False)
        channels[c] = vol.array
        thresholds[c] = preset.foreground_threshold
    if ref_shape is None or ref_affine is None:
        raise VolumeError(
            record.paths()[0], f"subject has none of the cache modalities {modalities}"
        )
    image = np.zeros((len(modalities), *ref_shape), dtype=dtype)
    for c, arr in enumerate(channels):
        if arr is not None:
            image[c] = arr
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save_npy(folder / "image.npy", image)
    _atomic_save_npy(folder / "foreground.npy", _foreground_points(image, thresholds, 0))
    for name, rec in sorted(record.labels.items()):
        lab = preprocess(
            _read_3d(
                rec.path, None, record.subject, len(rec.shape), np.int32, **rec.read_options()
            ),
            spacing,
            None,
            label=True,
        )
        if lab.shape != ref_shape or not np.allclose(lab.affine, ref_affine, atol=1e-3):
            if f"label:{name}" not in record.resampled:
                raise VolumeError(rec.path, "label grid differs from the subject's image grid")
            lab.array = _onto_grid(lab, ref_affine, ref_shape, label=True)
        _atomic_save_npy(folder / f"label_{name}.npy", lab.array.astype(np.int32))
    landmarks = {}
    if record.landmarks:
        landmarks = {k: [float(x) for x in v] for k, v in load_landmarks(record.landmarks).items()}
    meta = {
        "subject": record.subject,
        "affine": ref_affine.tolist(),
        "shape": list(ref_shape),
        "modalities": modalities,
        "present": [c is not None for c in channels],
        "labels": sorted(record.labels),
        "landmarks": landmarks,
        "sources": {m: r.path for m, r in record.images.items()},
        "fingerprint": fingerprint,
    }
    if record.resampled:  # say which files were resampled onto the reference grid
        meta["resampled"] = {"reference": record.reference, **record.resampled}
    atomic_write_json(folder / "meta.json", meta)


def _entry_intact(folder: Path, meta: dict[str, Any]) -> bool:
    """Every file ``meta.json`` promises is there, readable, with the promised shape."""
    try:
        image = np.load(folder / "image.npy", mmap_mode="r")
        if tuple(image.shape) != (len(meta["modalities"]), *meta["shape"]):
            return False
        np.load(folder / "foreground.npy", mmap_mode="r")
        for name in meta.get("labels", []):
            lab = np.load(folder / f"label_{name}.npy", mmap_mode="r")
            if tuple(lab.shape) != tuple(meta["shape"]):
                return False
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return False
    return True


@dataclass
class _Job:
    """One subject to cache, with the settings (pickled to a worker process)."""

    record: SubjectRecord
    folder: Path
    modalities: list[str]
    presets: dict[str, IntensityPreset]
    spacing: float | None
    dtype: str
    preset_dict: dict[str, Any]


def _failed(job: _Job, exc: Exception) -> tuple[str, str]:
    shutil.rmtree(job.folder, ignore_errors=True)
    known = isinstance(exc, AnatomapError | OSError)
    return "failed", str(exc) if known else f"{type(exc).__name__}: {exc}"


def _check_subject(job: _Job) -> tuple[str, str] | None:
    """``("reused", "")`` when the entry was built from the same sources and settings and is
    intact, ``None`` when it must be built (a stale ``meta.json`` is removed first, so the
    rebuilt entry gets it last again), ``("failed", reason)`` when that cannot be told."""
    try:
        fp = _record_fingerprint(job.record, job.spacing, job.preset_dict, job.dtype)
        meta_path = job.folder / "meta.json"
        if not meta_path.exists():
            return None
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if (
            old.get("fingerprint") == fp
            and old.get("modalities") == job.modalities
            and _entry_intact(job.folder, old)  # else half-written or damaged: rebuild
        ):
            return "reused", ""
        meta_path.unlink()
        return None
    except Exception as exc:  # one bad subject never stops the others
        return _failed(job, exc)


def _cache_subject(job: _Job) -> tuple[str, str]:
    """Build one entry (in a worker process): ``("built" | "failed", reason)``. Any failure
    stays with this subject: its folder is removed and the others go on."""
    try:
        fp = _record_fingerprint(job.record, job.spacing, job.preset_dict, job.dtype)
        _build_entry(
            job.record, job.folder, job.modalities, job.presets, job.spacing, job.dtype, fp
        )
        return "built", ""
    except Exception as exc:
        return _failed(job, exc)


def build_cache(
    manifest: str | Path | Iterable[SubjectRecord],
    out: str | Path,
    *,
    preset: str = "mri",
    spacing: float | None = 1.5,
    dtype: str = "float16",
    modalities: list[str] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> CacheBuildResult:
    """Preprocess every subject of a manifest into ``out`` (resumable, per-subject atomic).

    ``workers`` processes build subjects in parallel (``anatomap data cache`` uses every
    core). A subject that fails, or whose worker process dies, is reported in ``problems``
    (file and reason) and left out; the others are cached. Entries already built from the
    same sources and settings are reused. ``out`` is locked while it is written: a second
    writer fails at once (:class:`~anatomap.io.lock.LockError`).
    """
    # a listed file that has gone is reported for its subject only (the others are cached)
    if isinstance(manifest, str | Path):
        records = read_manifest(manifest, check_files=False)
    else:
        records = list(manifest)
    presets = parse_presets(preset)
    spacing = check_spacing(spacing)
    if dtype not in ("float16", "float32"):
        raise AnatomapError(f"dtype {dtype!r}: the cache stores float16 or float32")
    out = Path(out)
    if modalities is None:
        modalities = sorted({m for r in records for m in r.images})
    preset_dict = {k: v.to_dict() for k, v in presets.items()}
    problems: list[dict[str, str]] = []
    jobs: list[_Job] = []
    for record in records:
        if (why := unsafe_subject_id(record.subject)) is not None:
            problems.append({"subject": record.subject, "reason": why})  # never a path
            continue
        folder = out / "subjects" / record.subject
        jobs.append(_Job(record, folder, modalities, presets, spacing, dtype, preset_dict))
    with folder_lock(out, "cache"):
        (out / "subjects").mkdir(parents=True, exist_ok=True)
        outcomes: list[Any] = [_check_subject(job) for job in jobs]  # reuse: no workers
        todo = [i for i, o in enumerate(outcomes) if o is None]
        with tqdm(total=len(todo), desc="cache", unit="subject", disable=not progress) as bar:
            results = run_each(
                _cache_subject, [jobs[i] for i in todo], workers, lambda i: bar.update(1)
            )
        for i, outcome in zip(todo, results, strict=True):
            outcomes[i] = outcome
        done: list[str] = []
        for job, outcome in zip(jobs, outcomes, strict=True):
            status, reason = ("failed", outcome.reason) if isinstance(outcome, Failed) else outcome
            if status == "failed":
                problems.append({"subject": job.record.subject, "reason": reason})
                shutil.rmtree(job.folder, ignore_errors=True)
            else:
                done.append(job.record.subject)
        built = sum(1 for o in outcomes if not isinstance(o, Failed) and o[0] == "built")
        _write_index(out, done, modalities, spacing, preset_dict, dtype)
    return CacheBuildResult(Cache(out), problems, built, len(done) - built)


def _write_index(
    out: Path,
    done: list[str],
    modalities: list[str],
    spacing: float | None,
    preset_dict: dict[str, Any],
    dtype: str,
) -> None:
    """``cache.json``: the settings, the subjects cached and their combined fingerprint."""
    h = hashlib.sha256()
    for sid in done:
        h.update(
            json.loads((out / "subjects" / sid / "meta.json").read_text())["fingerprint"].encode()
        )
    info = {
        "version": CACHE_VERSION,
        "modalities": modalities,
        "spacing": spacing,
        "presets": preset_dict,
        "dtype": dtype,
        "subjects": done,
        "fingerprint": h.hexdigest()[:16],
    }
    atomic_write_json(out / "cache.json", info)
