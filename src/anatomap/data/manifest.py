"""Index a folder of scans into a validated manifest (one record per subject).

:func:`index_directory` discovers images, label maps, landmark files and DICOM series, reads
every one of them with :func:`anatomap.io.read_volume` (the validation) and checks that the
modalities of one subject share one voxel grid. Files that cannot be used become
:class:`Problem` entries; everything else is still indexed. Manifests are JSONL files, one
subject per line, written atomically by :func:`write_manifest`.

Naming rules (file name without extension):

* ``<subject>_<modality>``: everything before the last ``_`` is the subject, the last token the
  modality (BIDS ``sub-001_T1w``, BraTS ``BraTS20_Training_001_t1``, nnU-Net ``case_0000``);
  a name without ``_`` is a subject with modality ``"image"``.
* Label maps end in one of ``label_suffixes`` (``sub-001_tissue_dseg``: label ``"tissue"``;
  ``BraTS20_Training_001_seg``: label ``"seg"``), or sit in a folder whose name starts with
  ``labels`` (nnU-Net ``labelsTr/case.nii.gz``: label ``"label"``). They belong to the image
  subject whose id is the longest prefix of their name.
* ``<subject>_landmarks.csv`` (columns ``name,x,y,z``, world RAS+ mm) is matched the same way.
* A folder holding DICOM files is one scan: subject = folder name, modality = DICOM Modality.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError, VolumeError
from anatomap.io.readers import image_suffix, read_volume, strip_suffix

LANDMARK_SUFFIX = "_landmarks.csv"
DEFAULT_LABEL_SUFFIXES = ("dseg", "seg", "label", "labels")
GRID_ATOL_MM = 1e-3
_KINDS = ("image", "label", "landmarks")


class ManifestError(AnatomapError):
    """A manifest, table or landmark file that cannot be used: names the file and the problem."""

    def __init__(self, path: str | Path, reason: str, missing: Sequence[str] = ()) -> None:
        self.path = str(path)
        self.reason = reason
        self.missing = list(missing)  # files a manifest lists that no longer exist
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


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
            rec.values = _label_values(arr)
        else:
            a64 = arr.astype(np.float64, copy=False)
            rec.intensity = {
                "min": float(a64.min()),
                "max": float(a64.max()),
                "mean": float(a64.mean()),
                "std": float(a64.std()),
            }
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
        if self.intensity is not None:
            d["intensity"] = dict(self.intensity)
        if self.values is not None:
            d["values"] = list(self.values)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        affine = [[float(v) for v in row] for row in d["affine"]]
        if np.asarray(affine).shape != (4, 4):
            raise ValueError("affine must be 4x4")
        return cls(
            path=str(d["path"]),
            shape=tuple(int(n) for n in d["shape"]),
            spacing=tuple(float(s) for s in d["spacing"]),
            orientation=str(d["orientation"]),
            affine=affine,
            dtype=str(d.get("dtype", "")),
            intensity=dict(d["intensity"]) if d.get("intensity") is not None else None,
            values=[int(v) for v in d["values"]] if d.get("values") is not None else None,
        )


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


def outside_roots(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (made absolute, ``..`` collapsed; symlinks not followed) lies outside
    every folder in ``roots``."""
    p = Path(os.path.abspath(path))
    return not any(p == r or r in p.parents for r in (Path(os.path.abspath(q)) for q in roots))


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
    """What :func:`index_directory` found: usable subjects and the problems it met."""

    subjects: list[SubjectRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def modalities(self) -> list[str]:
        return sorted({m for s in self.subjects for m in s.images})

    def to_dict(self) -> dict[str, Any]:
        return {
            "subjects": [s.to_dict() for s in self.subjects],
            "problems": [p.to_dict() for p in self.problems],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexResult:
        return cls(
            subjects=[SubjectRecord.from_dict(s) for s in d.get("subjects", [])],
            problems=[Problem.from_dict(p) for p in d.get("problems", [])],
        )

    def problems_for(self, path: str | Path) -> list[Problem]:
        """Problems about ``path`` (compared after resolving)."""
        target = str(Path(path).resolve())
        return [p for p in self.problems if str(Path(p.path).resolve()) == target]


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    kind: str  # image | label | landmarks
    subject: str
    name: str  # modality (images), label name (labels), "" (landmarks)
    path: Path


def _split_name(name: str) -> tuple[str, str]:
    """``(subject, modality)`` of a file name without extension."""
    if "_" in name:
        subject, modality = name.rsplit("_", 1)
        if subject and modality:
            return subject, modality
    return name, "image"


def _looks_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return True
    if suffix:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        if len(head) == 132 and head[128:] == b"DICM":
            return True
        import pydicom

        pydicom.dcmread(path, stop_before_pixels=True)
        return True
    except Exception:
        return False


def _dicom_modality(folder: Path) -> str:
    import pydicom

    for f in sorted(folder.iterdir()):
        if f.is_file() and _looks_dicom(f):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Modality"])
            except Exception:
                continue
            modality = str(ds.get("Modality", "") or "").strip()
            if modality:
                return modality
    return "image"


def _match_subject(name: str, subjects: Sequence[str]) -> str | None:
    """The longest subject id that is ``name`` or a ``_``-delimited prefix of it."""
    best = None
    for s in subjects:
        if (name == s or name.startswith(s + "_")) and (best is None or len(s) > len(best)):
            best = s
    return best


def _discover(
    root: Path, label_suffixes: Sequence[str]
) -> tuple[list[_Entry], list[tuple[Path, str]], list[Problem]]:
    """Walk ``root``: image entries, unassigned (label|landmarks, path), problems."""
    suffixes = {s.lower() for s in label_suffixes}
    entries: list[_Entry] = []
    pending: list[tuple[Path, str]] = []
    problems: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        files = sorted(n for n in filenames if not n.startswith("."))
        if not dirnames and not files and d != root:
            problems.append(Problem(str(d), "empty folder (no files)"))
            continue
        if any(_looks_dicom(d / n) for n in files if image_suffix(n) is None):
            entries.append(_Entry("image", d.name, _dicom_modality(d), d))
        in_label_dir = d.name.lower().startswith("labels")
        for n in files:
            f = d / n
            if n.lower().endswith(LANDMARK_SUFFIX):
                pending.append((f, "landmarks"))
                continue
            if image_suffix(n) is None:
                continue
            stem = strip_suffix(n)
            subject, token = _split_name(stem)
            if ("_" in stem and token.lower() in suffixes) or in_label_dir:
                pending.append((f, "label"))
            else:
                entries.append(_Entry("image", subject, token, f))
    return entries, pending, problems


def _assign(
    pending: Iterable[tuple[Path, str]], subjects: Sequence[str], label_suffixes: Sequence[str]
) -> tuple[list[_Entry], list[Problem]]:
    """Attach label maps and landmark files to the image subject their name starts with."""
    suffixes = {s.lower() for s in label_suffixes}
    out: list[_Entry] = []
    problems: list[Problem] = []
    for path, kind in pending:
        name = path.name[: -len(LANDMARK_SUFFIX)] if kind == "landmarks" else strip_suffix(path)
        subject = _match_subject(name, subjects)
        if subject is None:
            what = "landmark file" if kind == "landmarks" else "label map"
            problems.append(Problem(str(path), f"{what} matches no image subject"))
            continue
        if kind == "landmarks":
            out.append(_Entry("landmarks", subject, "", path))
            continue
        rest = name[len(subject) + 1 :]
        tokens = rest.split("_") if rest else []
        if tokens and tokens[-1].lower() in suffixes:
            label = "_".join(tokens[:-1]) or tokens[-1]
        else:
            label = rest or "label"
        out.append(_Entry("label", subject, label, path))
    return out, problems


def _read_table(table: Path) -> list[_Entry]:
    """Entries of a ``subject,modality,path[,kind]`` CSV (paths relative to its folder)."""
    if not table.is_file():
        raise ManifestError(table, "table not found")
    entries = []
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in reader.fieldnames or []}
            lacking = [c for c in ("subject", "modality", "path") if c not in cols]
            if lacking:
                raise ManifestError(table, f"missing column(s): {', '.join(lacking)}")
            for row in reader:
                line = reader.line_num

                def get(key: str, row: dict = row) -> str:
                    return (row.get(cols[key]) or "").strip() if key in cols else ""

                subject, name, rel, kind = get("subject"), get("modality"), get("path"), get("kind")
                kind = kind.lower() or "image"
                if not (subject or name or rel):
                    continue
                if kind not in _KINDS:
                    raise ManifestError(table, f"line {line}: kind must be one of {_KINDS}")
                if not subject or not rel or (kind != "landmarks" and not name):
                    raise ManifestError(table, f"line {line}: empty subject, modality or path")
                path = Path(rel).expanduser()
                if not path.is_absolute():
                    path = table.parent / path
                entries.append(_Entry(kind, subject, name if kind != "landmarks" else "", path))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(table, f"cannot read table: {exc}") from exc
    return entries


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _label_values(arr: np.ndarray) -> list[int]:
    flat = arr.ravel()
    if flat.size and flat.min() >= 0 and flat.max() < 1 << 16:
        return [int(v) for v in np.flatnonzero(np.bincount(flat.astype(np.int64)))]
    return [int(v) for v in np.unique(flat)]


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
) -> IndexResult:
    """Discover, read and validate every scan under ``root`` (or listed in ``table``).

    ``table`` is a CSV with columns ``subject,modality,path`` (optional ``kind``:
    image|label|landmarks) that replaces discovery. Unusable files become
    :class:`Problem` entries; a subject without any valid image is dropped.

    The files of a subject must share the grid of its reference image (``reference``
    modality when the subject has it, else the first modality by name). With ``resample``,
    a file on another grid is kept and listed in ``SubjectRecord.resampled`` (with the
    difference): the cache resamples it onto the reference grid.
    """
    root_path = Path(root).expanduser().resolve()
    problems: list[Problem] = []
    if table is not None:
        table_path = Path(table).expanduser().resolve()
        entries = []
        # a table reads only inside its own folder and ``root`` (no ../ or absolute escapes)
        for e in _read_table(table_path):
            if (why := unsafe_subject_id(e.subject)) is not None:
                problems.append(Problem(str(e.path), why, ""))
            elif outside_roots(e.path, [table_path.parent, root_path]):
                problems.append(
                    Problem(
                        str(e.path),
                        f"path outside the data folders ({table_path.parent} and {root_path}); "
                        "pass the folder holding it as the data root",
                        e.subject,
                    )
                )
            else:
                entries.append(e)
    else:
        if not root_path.is_dir():
            raise ManifestError(root_path, "not a folder")
        images, pending, problems = _discover(root_path, label_suffixes)
        subject_ids = sorted({e.subject for e in images})
        attached, more = _assign(pending, subject_ids, label_suffixes)
        entries = images + attached
        problems += more
    if not entries:
        problems.append(Problem(str(root_path), "no image files found"))

    # duplicates: keep the first in sorted path order
    by_key: dict[tuple[str, str, str], _Entry] = {}
    for e in sorted(entries, key=lambda e: (e.subject, e.kind, e.name, str(e.path))):
        key = (e.subject, e.kind, e.name)
        if key in by_key:
            what = {"image": "modality", "label": "label", "landmarks": "landmarks"}[e.kind]
            problems.append(
                Problem(
                    str(e.path),
                    f"duplicate {what} '{e.name or e.kind}' for subject {e.subject} "
                    f"(already {by_key[key].path})",
                    e.subject,
                )
            )
            continue
        by_key[key] = e

    per_subject: dict[str, list[_Entry]] = {}
    for e in by_key.values():
        per_subject.setdefault(e.subject, []).append(e)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(by_key), desc="indexing", unit="file")

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
        )
        problems += subject_problems
        if rec is not None:
            subjects.append(rec)
    if bar is not None:
        bar.close()

    all_modalities = sorted({m for s in subjects for m in s.images})
    for s in subjects:
        s.missing = [m for m in all_modalities if m not in s.images]
    return IndexResult(subjects=subjects, problems=problems)


def _index_subject(
    sid: str,
    entries: list[_Entry],
    *,
    expect_ndim: int | None,
    check_finite: bool,
    bar: Any,
    resample: bool = False,
    reference: str | None = None,
) -> tuple[SubjectRecord | None, list[Problem]]:
    problems: list[Problem] = []
    rec = SubjectRecord(subject=sid)
    ref: ImageRecord | None = None
    ref_name = ""
    order = {"image": 0, "label": 1, "landmarks": 2}

    def key(e: _Entry) -> tuple:  # the reference modality first among the images
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
        try:
            vol = read_volume(
                e.path,
                modality=e.name,
                subject=sid,
                expect_ndim=expect_ndim,
                check_finite=check_finite,
                dtype=np.int32 if label else None,
            )
        except VolumeError as exc:
            problems.append(Problem(str(e.path), exc.reason, sid))
            continue
        img = ImageRecord.from_volume(vol, label=label)
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


def _atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    _atomic_write_lines(p, (json.dumps(s.to_dict()) for s in subjects))
    side = problems_path(p)
    if problems:
        _atomic_write_lines(side, (json.dumps(q.to_dict()) for q in problems))
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
