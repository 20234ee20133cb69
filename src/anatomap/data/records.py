"""The index's data model: validated scans, subject records, rejected files, and their JSON.

:class:`ImageRecord` summarises one validated scan, :class:`SubjectRecord` gathers a
subject's scans, label maps and landmark file, :class:`Problem` is a file left out (and why),
and :class:`IndexResult` is what :func:`anatomap.data.manifest.index_directory` returns. Each
converts to and from the JSON of the manifest files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError


class ManifestError(AnatomapError):
    """A manifest, table or landmark file that cannot be used: names the file and the problem."""

    def __init__(self, path: str | Path, reason: str, missing: Sequence[str] = ()) -> None:
        self.path = str(path)
        self.reason = reason
        self.missing = list(missing)  # files a manifest lists that no longer exist
        super().__init__(f"{self.path}: {reason}")


@dataclass
class ImageRecord:
    """Summary of one validated scan (image or label map)."""

    path: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    affine: list[list[float]]
    dtype: str = ""
    intensity: dict[str, float] | None = None  # images: min, max, mean, std
    values: list[int] | None = None  # label maps: label values present
    volume_index: int | None = None  # the volume read from a 4-D file (MSD channels)
    series: str | None = None  # the SeriesInstanceUID read from a DICOM folder
    meta: dict[str, Any] = field(default_factory=dict)  # BIDS entities, DICOM series tags

    @classmethod
    def from_volume(cls, volume: Volume, *, label: bool = False) -> ImageRecord:
        """Summarise ``volume`` (label maps get their label values instead of intensities)."""
        arr = volume.array
        rec = cls(
            path=volume.path,
            shape=volume.shape,
            spacing=tuple(round(s, 6) for s in volume.spacing),
            orientation=volume.orientation,
            affine=np.asarray(volume.affine, np.float64).tolist(),
            dtype=str(volume.meta.get("source_dtype", arr.dtype)),
        )
        if label:
            rec.values = label_values(arr)
        else:
            a64 = arr.astype(np.float64, copy=False)
            with np.errstate(all="ignore"):  # NaN voxels (check_finite=False) give None
                stats = {"min": a64.min(), "max": a64.max(), "mean": a64.mean(), "std": a64.std()}
            rec.intensity = {k: _finite(v) for k, v in stats.items()}
        return rec

    @property
    def affine_array(self) -> np.ndarray:
        return np.asarray(self.affine, np.float64)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "orientation": self.orientation,
            "affine": [list(map(float, row)) for row in self.affine],
            "dtype": self.dtype,
        }
        if self.intensity is not None:  # standard JSON: no NaN / Infinity
            d["intensity"] = {k: _finite(v) for k, v in self.intensity.items()}
        if self.values is not None:
            d["values"] = list(self.values)
        if self.volume_index is not None:
            d["volume_index"] = int(self.volume_index)
        if self.series:
            d["series"] = self.series
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        affine = [[float(v) for v in row] for row in d["affine"]]
        if np.asarray(affine).shape != (4, 4):
            raise ValueError("affine must be 4x4")
        if not np.isfinite(affine).all() or not np.isfinite(np.asarray(d["spacing"], float)).all():
            raise ValueError("affine and spacing must be finite numbers")
        return cls(
            path=str(d["path"]),
            shape=tuple(int(n) for n in d["shape"]),
            spacing=tuple(float(s) for s in d["spacing"]),
            orientation=str(d["orientation"]),
            affine=affine,
            dtype=str(d.get("dtype", "")),
            intensity=dict(d["intensity"]) if d.get("intensity") is not None else None,
            values=[int(v) for v in d["values"]] if d.get("values") is not None else None,
            volume_index=int(d["volume_index"]) if d.get("volume_index") is not None else None,
            series=str(d["series"]) if d.get("series") else None,
            meta=dict(d.get("meta") or {}),
        )

    def read_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~anatomap.io.read_volume` that pick this scan out
        of its file or folder (a 4-D volume, a DICOM series)."""
        out: dict[str, Any] = {}
        if self.volume_index is not None:
            out["volume_index"] = self.volume_index
        if self.series:
            out["series"] = self.series
        return out


def _finite(value: Any) -> float | None:
    """``value`` as a float, or ``None`` when it is missing, NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def unsafe_subject_id(subject: str) -> str | None:
    """Why ``subject`` cannot name a cache folder (path separators, ``..``, a leading dot,
    control characters), or ``None`` if it can."""
    if (
        not subject
        or subject in (".", "..")
        or subject.startswith(".")
        or any(c in subject for c in "/\\")
        or any(ord(c) < 32 for c in subject)
    ):
        return f"subject id {subject!r} is not a plain name (no '/', '\\', '..', leading '.')"
    return None


@dataclass
class SubjectRecord:
    """All validated files of one subject; ``missing`` lists modalities other subjects have."""

    subject: str
    images: dict[str, ImageRecord] = field(default_factory=dict)
    labels: dict[str, ImageRecord] = field(default_factory=dict)
    landmarks: str | None = None
    missing: list[str] = field(default_factory=list)
    # index_directory(resample=True): files on another grid than the reference image, which
    # the cache resamples onto the reference grid ({modality or "label:<name>": why})
    reference: str = ""
    resampled: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # BIDS participant/session, split, ...

    @property
    def modalities(self) -> list[str]:
        return sorted(self.images)

    def paths(self) -> list[str]:
        """Every file (or DICOM folder) this record points to."""
        out = [r.path for r in self.images.values()] + [r.path for r in self.labels.values()]
        return out + ([self.landmarks] if self.landmarks else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "images": {k: v.to_dict() for k, v in sorted(self.images.items())},
            "labels": {k: v.to_dict() for k, v in sorted(self.labels.items())},
            "landmarks": self.landmarks,
            "missing": list(self.missing),
            **(
                {"reference": self.reference, "resampled": self.resampled} if self.resampled else {}
            ),
            **({"meta": self.meta} if self.meta else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SubjectRecord:
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        subject = d["subject"]
        if not isinstance(subject, str) or not subject:
            raise ValueError("'subject' must be a non-empty string")
        if (why := unsafe_subject_id(subject)) is not None:
            raise ValueError(why)
        return cls(
            subject=subject,
            images={str(k): ImageRecord.from_dict(v) for k, v in d.get("images", {}).items()},
            labels={str(k): ImageRecord.from_dict(v) for k, v in d.get("labels", {}).items()},
            landmarks=str(d["landmarks"]) if d.get("landmarks") else None,
            missing=[str(m) for m in d.get("missing", [])],
            reference=str(d.get("reference", "")),
            resampled={str(k): str(v) for k, v in d.get("resampled", {}).items()},
            meta=dict(d.get("meta") or {}),
        )


@dataclass
class Problem:
    """A file (or folder) that was left out of the index, and why."""

    path: str
    reason: str
    subject: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "subject": self.subject}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(path=str(d["path"]), reason=str(d["reason"]), subject=str(d.get("subject", "")))


@dataclass
class IndexResult:
    """What :func:`index_directory` found: usable subjects, the problems it met (files that
    could not be used), the files it left out on purpose (``skipped``) and the layout."""

    subjects: list[SubjectRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    layout: str = ""  # flat, bids, ... ("table" for --table)
    layout_reason: str = ""  # "TotalSegmentator-style folder per subject, because ..."

    @property
    def modalities(self) -> list[str]:
        return sorted({m for s in self.subjects for m in s.images})

    def to_dict(self) -> dict[str, Any]:
        return {
            "subjects": [s.to_dict() for s in self.subjects],
            "problems": [p.to_dict() for p in self.problems],
            "skipped": [p.to_dict() for p in self.skipped],
            "layout": self.layout,
            "layout_reason": self.layout_reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexResult:
        return cls(
            subjects=[SubjectRecord.from_dict(s) for s in d.get("subjects", [])],
            problems=[Problem.from_dict(p) for p in d.get("problems", [])],
            skipped=[Problem.from_dict(p) for p in d.get("skipped", [])],
            layout=str(d.get("layout", "")),
            layout_reason=str(d.get("layout_reason", "")),
        )

    def problems_for(self, path: str | Path) -> list[Problem]:
        """Problems about ``path`` (compared after resolving)."""
        target = str(Path(path).resolve())
        return [p for p in self.problems if str(Path(p.path).resolve()) == target]


def label_values(arr: np.ndarray) -> list[int]:
    """The label values present in a label map, ascending."""
    flat = arr.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 16:
        return [int(v) for v in np.flatnonzero(np.bincount(flat.astype(np.int64)))]
    return [int(v) for v in np.unique(flat)]
