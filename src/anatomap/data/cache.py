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
complete, and a rebuild skips entries whose source fingerprint still matches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from anatomap.data.manifest import (
    SubjectRecord,
    load_landmarks,
    read_manifest,
    stat_signature,
    unsafe_subject_id,
)
from anatomap.data.preprocess import IntensityPreset, parse_presets, preprocess, preset_for
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError, VolumeError
from anatomap.io import read_volume
from anatomap.io.atomic import WriteError, atomic_path, atomic_write_json

CACHE_VERSION = 1
MAX_FOREGROUND_POINTS = 50_000


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save ``array`` to ``path`` atomically (the reliability tests patch this seam)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


@dataclass
class CachedSubject:
    """One preprocessed subject, memory-mapped on first access."""

    root: Path
    meta: dict[str, Any]
    _image: np.ndarray | None = field(default=None, repr=False)
    _foreground: np.ndarray | None = field(default=None, repr=False)

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
        return np.asarray(self.meta["present"], bool)

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            self._image = np.load(self.root / "image.npy", mmap_mode="r")
        return self._image

    @property
    def foreground(self) -> np.ndarray:
        if self._foreground is None:
            # Memory-mapped too: a loaded copy (600 KB per subject) per worker would grow
            # with the data set (benchmarks/scaling.py).
            self._foreground = np.load(self.root / "foreground.npy", mmap_mode="r")
        return self._foreground

    def label(self, name: str) -> np.ndarray:
        path = self.root / f"label_{name}.npy"
        if not path.exists():
            raise AnatomapError(f"{self.root}: subject {self.id} has no label map '{name}'")
        return np.load(path, mmap_mode="r")

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.get("labels", []))

    @property
    def landmarks(self) -> dict[str, np.ndarray]:
        """Named landmarks in world mm (RAS+), if the manifest had any."""
        return {k: np.asarray(v, np.float64) for k, v in self.meta.get("landmarks", {}).items()}


class Cache:
    """Read access to a cache folder written by :func:`build_cache`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
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
        return list(self.info["modalities"])

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
            self._entries[subject] = CachedSubject(folder, meta)
        return self._entries[subject]

    def fingerprint(self) -> str:
        return str(self.info.get("fingerprint", ""))

    def __getstate__(self) -> dict:
        # Memory maps are reopened in each DataLoader worker, never pickled.
        return {"root": self.root, "info": self.info, "_entries": {}}


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
    for key, path in items:
        h.update(f"{key}|{path}|{stat_signature(path)}".encode())
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
    path: str, modality: str | None, subject: str, ndim: int, dtype: type | None = None
) -> Volume:
    """Read a scan as indexed; a 2-D image becomes a one-slice volume ``[X, Y, 1]`` (its 4x4
    affine already places slice 0), so 2-D data shares the 3-D cache and sampler."""
    vol = read_volume(path, modality=modality, subject=subject, expect_ndim=ndim, dtype=dtype)
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
        vol = preprocess(_read_3d(rec.path, m, record.subject, len(rec.shape)), spacing, preset)
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
            _read_3d(rec.path, None, record.subject, len(rec.shape), np.int32),
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


def build_cache(
    manifest: str | Path | Iterable[SubjectRecord],
    out: str | Path,
    *,
    preset: str = "mri",
    spacing: float | None = 1.5,
    dtype: str = "float16",
    modalities: list[str] | None = None,
    progress: bool = True,
) -> CacheBuildResult:
    """Preprocess every subject of a manifest into ``out`` (resumable, per-subject atomic).

    A subject that fails is reported in ``problems`` (file and reason) and left out; the
    others are cached. Entries already built from the same sources and settings are reused.
    """
    # a listed file that has gone is reported for its subject only (the others are cached)
    if isinstance(manifest, str | Path):
        records = read_manifest(manifest, check_files=False)
    else:
        records = list(manifest)
    presets = parse_presets(preset)
    out = Path(out)
    (out / "subjects").mkdir(parents=True, exist_ok=True)
    if modalities is None:
        modalities = sorted({m for r in records for m in r.images})
    preset_dict = {k: v.to_dict() for k, v in presets.items()}
    problems: list[dict[str, str]] = []
    done: list[str] = []
    built = reused = 0
    for record in tqdm(records, desc="cache", unit="subject", disable=not progress):
        if (why := unsafe_subject_id(record.subject)) is not None:
            problems.append({"subject": record.subject, "reason": why})  # never a path
            continue
        folder = out / "subjects" / record.subject
        try:
            fp = _record_fingerprint(record, spacing, preset_dict, dtype)
            meta_path = folder / "meta.json"
            if meta_path.exists():
                try:
                    old = json.loads(meta_path.read_text())
                except json.JSONDecodeError:
                    old = {}
                if (
                    old.get("fingerprint") == fp
                    and old.get("modalities") == modalities
                    and _entry_intact(folder, old)  # else half-written or damaged: rebuild
                ):
                    done.append(record.subject)
                    reused += 1
                    continue
                meta_path.unlink()  # stale: rebuild (meta.json goes last again)
            _build_entry(record, folder, modalities, presets, spacing, dtype, fp)
            done.append(record.subject)
            built += 1
        except (VolumeError, WriteError, OSError) as exc:
            problems.append({"subject": record.subject, "reason": str(exc)})
            shutil.rmtree(folder, ignore_errors=True)
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
    return CacheBuildResult(Cache(out), problems, built, reused)
