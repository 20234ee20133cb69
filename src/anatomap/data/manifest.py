"""Index a folder of scans into a validated manifest (one record per subject).

:func:`index_directory` finds images, label maps, landmark files and DICOM series
(:mod:`anatomap.data.discovery`, which also states the naming rules), reads every one of them
with :func:`anatomap.io.read_volume` (the validation) and checks that the modalities of one
subject share one voxel grid. Files that cannot be used become :class:`Problem` entries;
everything else is still indexed. Manifests are JSONL files, one subject per line
(:mod:`anatomap.data.records`), written atomically by :func:`write_manifest`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anatomap.data.discovery import (
    DEFAULT_LABEL_SUFFIXES,
    LANDMARK_SUFFIX,
    Entry,
    group_entries,
    outside_roots,
    table_entries,
)
from anatomap.data.layouts import Options, discover
from anatomap.data.records import (
    ImageRecord,
    IndexResult,
    ManifestError,
    Problem,
    SubjectRecord,
    unsafe_subject_id,
)
from anatomap.errors import AnatomapError, VolumeError
from anatomap.io.atomic import atomic_write_lines, json_safe
from anatomap.io.readers import read_volume

__all__ = [  # the records and discovery names are re-exported: importers use this module
    "DEFAULT_LABEL_SUFFIXES",
    "GRID_ATOL_MM",
    "LANDMARK_SUFFIX",
    "ImageRecord",
    "IndexResult",
    "ManifestError",
    "Problem",
    "SubjectRecord",
    "index_directory",
    "load_landmarks",
    "manifest_fingerprint",
    "outside_roots",
    "problems_path",
    "read_manifest",
    "read_problems",
    "stat_signature",
    "unsafe_subject_id",
    "write_manifest",
]

GRID_ATOL_MM = 1e-3


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _grid_difference(ref: ImageRecord, rec: ImageRecord) -> str | None:
    """Why ``rec`` is not on ``ref``'s voxel grid, or ``None`` if it is."""
    if tuple(ref.shape) != tuple(rec.shape):
        return f"grid differs from {ref.path}: shape {tuple(rec.shape)} vs {tuple(ref.shape)}"
    diff = float(np.abs(ref.affine_array - rec.affine_array).max())
    if not np.allclose(ref.affine_array, rec.affine_array, atol=GRID_ATOL_MM, rtol=0):
        return f"grid differs from {ref.path}: affine differs by up to {diff:.4g} mm"
    return None


def index_directory(
    root: str | Path,
    *,
    table: str | Path | None = None,
    expect_ndim: int | None = 3,
    label_suffixes: Sequence[str] = DEFAULT_LABEL_SUFFIXES,
    check_finite: bool = True,
    progress: bool = False,
    resample: bool = False,
    reference: str | None = None,
    layout: str = "auto",
    derivatives: bool = False,
) -> IndexResult:
    """Discover, read and validate every scan under ``root`` (or listed in ``table``).

    ``layout`` (``auto``, ``bids``, ``nnunet``, ``msd``, ``folder-per-subject``, ``flat``,
    ``dicom``; :mod:`anatomap.data.layouts`) says how files are named; ``auto`` detects it.
    ``derivatives`` also indexes a BIDS data set's ``derivatives/``. ``table`` is a CSV with
    columns ``subject,modality,path`` (optional ``kind``: image|label|landmarks) that replaces
    discovery. Unusable files become :class:`Problem` entries, files left out on purpose
    ``skipped`` notes; a subject without any valid image is dropped.

    The files of a subject must share the grid of its reference image (``reference``
    modality when the subject has it, else the first modality by name). With ``resample``,
    a file on another grid is kept and listed in ``SubjectRecord.resampled`` (with the
    difference): the cache resamples it onto the reference grid.
    """
    root_path = Path(root).expanduser().resolve()
    result = IndexResult(layout="table", layout_reason="--table lists the files")
    roots = [root_path]  # every file a header names must lie here too (io.headers)
    if table is not None:
        roots.append(Path(table).expanduser().resolve().parent)
        entries, problems = table_entries(Path(table).expanduser().resolve(), root_path)
        subject_meta: dict[str, dict[str, Any]] = {}
    else:
        found, chosen, why = discover(root_path, layout, Options(label_suffixes, derivatives))
        entries, problems, subject_meta = found.entries, found.problems, found.subject_meta
        result.skipped = found.skipped
        result.layout, result.layout_reason = chosen.name, f"{why.title}, because {why.reason}"
    per_subject, duplicates = group_entries(entries)
    problems += duplicates

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, per_subject.values())), desc="indexing", unit="file")

    subjects: list[SubjectRecord] = []
    for sid in sorted(per_subject):
        if (why := unsafe_subject_id(sid)) is not None:
            problems += [Problem(str(e.path), why, "") for e in per_subject[sid]]
            continue
        rec, subject_problems = _index_subject(
            sid,
            per_subject[sid],
            expect_ndim=expect_ndim,
            check_finite=check_finite,
            bar=bar,
            resample=resample,
            reference=reference,
            roots=roots,
        )
        problems += subject_problems
        if rec is not None:
            rec.meta = dict(subject_meta.get(sid, {}))
            subjects.append(rec)
    if bar is not None:
        bar.close()

    all_modalities = sorted({m for s in subjects for m in s.images})
    for s in subjects:
        s.missing = [m for m in all_modalities if m not in s.images]
    result.subjects, result.problems = subjects, problems
    return result


def _index_subject(
    sid: str,
    entries: list[Entry],
    *,
    expect_ndim: int | None,
    check_finite: bool,
    bar: Any,
    resample: bool = False,
    reference: str | None = None,
    roots: Sequence[Path] | None = None,
) -> tuple[SubjectRecord | None, list[Problem]]:
    """Read and check one subject's files: its record (``None`` without a valid image) and
    the files left out."""
    problems: list[Problem] = []
    rec = SubjectRecord(subject=sid)
    ref: ImageRecord | None = None
    ref_name = ""
    order = {"image": 0, "label": 1, "landmarks": 2}

    def key(e: Entry) -> tuple:  # the reference modality first among the images
        return (order[e.kind], e.kind != "image" or e.name != reference, e.name, str(e.path))

    for e in sorted(entries, key=key):
        if bar is not None:
            bar.update(1)
        if e.kind != "image" and not rec.images:
            problems.append(Problem(str(e.path), f"subject {sid} has no valid image", sid))
            continue
        if e.kind == "landmarks":
            try:
                load_landmarks(e.path)
            except AnatomapError as exc:
                problems.append(Problem(str(e.path), getattr(exc, "reason", str(exc)), sid))
                continue
            rec.landmarks = str(e.path.resolve())
            continue
        label = e.kind == "label"
        picks = {"volume_index": e.volume_index} if e.volume_index is not None else {}
        picks.update({"series": e.series} if e.series else {})
        try:
            vol = read_volume(
                e.path,
                modality=e.name,
                subject=sid,
                expect_ndim=expect_ndim,
                check_finite=check_finite,
                dtype=np.int32 if label else None,
                roots=roots,
                **picks,
            )
        except VolumeError as exc:
            problems.append(Problem(str(e.path), exc.reason, sid))
            continue
        except (OSError, UnicodeError) as exc:  # one odd file never stops the others
            problems.append(Problem(str(e.path), f"cannot read: {exc}", sid))
            continue
        img = ImageRecord.from_volume(vol, label=label)
        img.volume_index, img.series, img.meta = e.volume_index, e.series, dict(e.meta)
        del vol
        if ref is None:
            ref = img
            ref_name = e.name
        else:
            why = _grid_difference(ref, img)
            if why is not None and resample:
                rec.reference = ref_name
                rec.resampled[f"label:{e.name}" if label else e.name] = why
            elif why is not None:
                problems.append(Problem(str(e.path), why, sid))
                continue
        (rec.labels if label else rec.images)[e.name] = img
    if not rec.images:
        return None, problems
    return rec, problems


# --------------------------------------------------------------------------------------------
# manifest files
# --------------------------------------------------------------------------------------------


def problems_path(path: str | Path) -> Path:
    """Where :func:`write_manifest` puts the problems of ``path``: ``<stem>.problems.jsonl``."""
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.problems.jsonl")


def write_manifest(
    result_or_subjects: IndexResult | Sequence[SubjectRecord], path: str | Path
) -> Path:
    """Write subjects as JSONL (one per line) atomically; returns ``path``.

    With an :class:`IndexResult` that has problems, they go to ``<stem>.problems.jsonl``
    beside it (a stale problems file from an earlier run is removed otherwise).
    """
    p = Path(path)
    if isinstance(result_or_subjects, IndexResult):
        subjects, problems = result_or_subjects.subjects, result_or_subjects.problems
    else:
        subjects, problems = list(result_or_subjects), []
    lines = (json.dumps(json_safe(s.to_dict()), allow_nan=False) for s in subjects)
    atomic_write_lines(p, lines, what="manifest")  # standard JSON: no NaN / Infinity
    side = problems_path(p)
    if problems:
        atomic_write_lines(side, (json.dumps(q.to_dict()) for q in problems), what="problems file")
    else:
        side.unlink(missing_ok=True)
    return p


def _resolve_paths(rec: SubjectRecord, base: Path) -> None:
    def fix(s: str) -> str:
        q = Path(s).expanduser()
        return str(q if q.is_absolute() else (base / q).resolve())

    for r in [*rec.images.values(), *rec.labels.values()]:
        r.path = fix(r.path)
    if rec.landmarks:
        rec.landmarks = fix(rec.landmarks)


def read_manifest(path: str | Path, check_files: bool = True) -> list[SubjectRecord]:
    """Subjects of a JSONL manifest (relative paths resolve against its folder).

    Raises :class:`ManifestError` naming the file and line for malformed lines or repeated
    subjects, and (``check_files``) listing files that no longer exist.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(p, "manifest not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(p, f"cannot read manifest: {exc}") from exc
    subjects: list[SubjectRecord] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = SubjectRecord.from_dict(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ManifestError(p, f"line {n}: not valid JSON ({exc.msg})") from exc
        except RecursionError:
            raise ManifestError(p, f"line {n}: not valid JSON (nested too deeply)") from None
        except KeyError as exc:
            raise ManifestError(p, f"line {n}: missing field {exc}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(p, f"line {n}: malformed record ({exc})") from exc
        if rec.subject in seen:
            raise ManifestError(
                p, f"line {n}: subject {rec.subject} already on line {seen[rec.subject]}"
            )
        seen[rec.subject] = n
        _resolve_paths(rec, p.parent)
        subjects.append(rec)
    if check_files:
        missing = [f for s in subjects for f in s.paths() if not os.path.exists(f)]
        if missing:
            shown = ", ".join(missing[:5]) + (
                f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            )
            reason = f"{len(missing)} listed file(s) no longer exist: {shown}"
            raise ManifestError(p, reason, missing)
    return subjects


def read_problems(path: str | Path) -> list[Problem]:
    """Problems written beside manifest ``path`` (empty if there were none)."""
    side = problems_path(path)
    if not side.exists():
        return []
    out = []
    for n, line in enumerate(side.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(Problem.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ManifestError(side, f"line {n}: malformed problem ({exc})") from exc
    return out


def load_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """``name -> [x, y, z]`` (world RAS+ mm) from a CSV with columns ``name,x,y,z``."""
    p = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in reader.fieldnames or []}
            lacking = [c for c in ("name", "x", "y", "z") if c not in cols]
            if lacking:
                raise ManifestError(p, f"missing column(s): {', '.join(lacking)}")
            for row in reader:
                line = reader.line_num
                name = (row.get(cols["name"]) or "").strip()
                if not name:
                    raise ManifestError(p, f"line {line}: empty landmark name")
                if name in out:
                    raise ManifestError(p, f"line {line}: duplicate landmark '{name}'")
                try:
                    xyz = np.array([float(row[cols[c]]) for c in "xyz"], np.float64)
                except (TypeError, ValueError) as exc:
                    raise ManifestError(p, f"line {line}: coordinates must be numbers") from exc
                if not np.all(np.isfinite(xyz)):
                    raise ManifestError(p, f"line {line}: non-finite coordinate")
                out[name] = xyz
    except FileNotFoundError as exc:
        raise ManifestError(p, "file not found") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(p, f"cannot read landmarks: {exc}") from exc
    if not out:
        raise ManifestError(p, "no landmarks in file")
    return out


def stat_signature(path: str) -> list[Any]:
    """Size and modification time of a file, or of every file in a DICOM folder."""
    p = Path(path)
    try:
        if p.is_dir():  # DICOM folder: every file in it
            return [
                [f.name, st.st_size, st.st_mtime_ns]
                for f in sorted(p.iterdir())
                if f.is_file() and (st := f.stat())
            ]
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return ["missing"]


def manifest_fingerprint(subjects: IndexResult | Sequence[SubjectRecord]) -> str:
    """SHA-256 over every listed file's path, size, mtime and shape (data provenance)."""
    subs = subjects.subjects if isinstance(subjects, IndexResult) else subjects
    items = []
    for s in subs:
        for kind, recs in (("image", s.images), ("label", s.labels)):
            for name, r in recs.items():
                items.append([s.subject, kind, name, r.path, list(r.shape), stat_signature(r.path)])
        if s.landmarks:
            items.append([s.subject, "landmarks", "", s.landmarks, [], stat_signature(s.landmarks)])
    items.sort(key=lambda x: json.dumps(x[:4]))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()
