"""Discovery: the named entries of a data folder, the naming rules they share, and tables.

An :class:`Entry` is one file (or DICOM series) named as an image, label map or landmark file
of a subject, before anything is read. The layouts (:mod:`anatomap.data.layouts`) walk a
folder into entries; :func:`read_table` reads them from a ``subject,modality,path[,kind]``
CSV instead; :func:`group_entries` drops duplicates and groups them per subject.
:func:`anatomap.data.manifest.index_directory` then reads and validates every entry.

Naming rules of flat folders (file name without extension), also used by other layouts:

* ``<subject>_<modality>``: everything before the last ``_`` is the subject, the last token the
  modality (BIDS ``sub-001_T1w``, BraTS ``BraTS20_Training_001_t1``, nnU-Net ``case_0000``);
  a name without ``_`` is split at its last ``-`` when the last token is a known modality or
  label word (``IXI002-Guys-0828-T1``, ``BraTS-GLI-00000-000-t1n``), otherwise it is a
  subject with modality ``"image"``.
* Label maps end in one of ``label_suffixes`` (``sub-001_tissue_dseg``: label ``"tissue"``;
  ``BraTS20_Training_001_seg``: label ``"seg"``), or sit in a folder whose name starts with
  ``labels`` (nnU-Net ``labelsTr/case.nii.gz``: label ``"label"``). They belong to the image
  subject whose id is the longest prefix of their name.
* ``<subject>_landmarks.csv`` (columns ``name,x,y,z``, world RAS+ mm) is matched the same way.
* A folder holding DICOM files is one scan: subject = folder name, modality = DICOM Modality.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anatomap.data.records import ManifestError, Problem, unsafe_subject_id
from anatomap.io.readers import strip_suffix

LANDMARK_SUFFIX = "_landmarks.csv"
DEFAULT_LABEL_SUFFIXES = ("dseg", "seg", "label", "labels")
KINDS = ("image", "label", "landmarks")
# last tokens after a '-' that name a modality or a label (IXI, BraTS 2023 file names)
DASH_TOKENS = frozenset(
    [
        "t1",
        "t2",
        "pd",
        "mra",
        "flair",
        "t1n",
        "t1c",
        "t2w",
        "t2f",
        "t1w",
        "t1ce",
        "t1gd",
        "ct",
        "mr",
        "pet",
        "adc",
        "dwi",
        "swi",
        "seg",
    ]
)


@dataclass
class Entry:
    """One file (or DICOM folder or series) found, before it is read."""

    kind: str  # image | label | landmarks
    subject: str
    name: str  # modality (images), label name (labels), "" (landmarks)
    path: Path
    volume_index: int | None = None  # the volume of a 4-D file (MSD's multi-channel images)
    series: str | None = None  # the SeriesInstanceUID of a folder holding several series
    meta: dict[str, Any] = field(default_factory=dict)  # BIDS entities, DICOM tags, ...


def outside_roots(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (made absolute, ``..`` collapsed; symlinks not followed) lies outside
    every folder in ``roots``."""
    p = Path(os.path.abspath(path))
    return not any(p == r or r in p.parents for r in (Path(os.path.abspath(q)) for q in roots))


def split_name(name: str) -> tuple[str, str]:
    """``(subject, modality)`` of a file name without extension."""
    if "_" in name:
        subject, modality = name.rsplit("_", 1)
        if subject and modality:
            return subject, modality
    elif "-" in name:
        subject, token = name.rsplit("-", 1)
        if subject and token.lower() in DASH_TOKENS:
            return subject, token
    return name, "image"


def looks_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file (``.dcm``, or no suffix and a DICOM header)."""
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


def dicom_modality(folder: Path) -> str:
    """The DICOM Modality of the first file in ``folder`` that has one, else ``"image"``."""
    import pydicom

    for f in sorted(folder.iterdir()):
        if f.is_file() and looks_dicom(f):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Modality"])
            except Exception:
                continue
            modality = str(ds.get("Modality", "") or "").strip()
            if modality:
                return modality
    return "image"


def match_subject(name: str, subjects: Sequence[str], seps: str = "_") -> str | None:
    """The longest subject id that is ``name`` or a prefix of it followed by one of ``seps``."""
    best = None
    for s in subjects:
        hit = name == s or any(name.startswith(s + c) for c in seps)
        if hit and (best is None or len(s) > len(best)):
            best = s
    return best


def assign(
    pending: Iterable[tuple[Path, str]], subjects: Sequence[str], label_suffixes: Sequence[str]
) -> tuple[list[Entry], list[Problem]]:
    """Attach label maps and landmark files to the image subject their name starts with."""
    suffixes = {s.lower() for s in label_suffixes}
    out: list[Entry] = []
    problems: list[Problem] = []
    for path, kind in pending:
        name = path.name[: -len(LANDMARK_SUFFIX)] if kind == "landmarks" else strip_suffix(path)
        subject = match_subject(name, subjects, "_" if "_" in name else "_-")
        if subject is None:
            what = "landmark file" if kind == "landmarks" else "label map"
            problems.append(Problem(str(path), f"{what} matches no image subject"))
            continue
        if kind == "landmarks":
            out.append(Entry("landmarks", subject, "", path))
            continue
        rest = name[len(subject) + 1 :]
        tokens = rest.split("_") if rest else []
        if tokens and tokens[-1].lower() in suffixes:
            label = "_".join(tokens[:-1]) or tokens[-1]
        else:
            label = rest or "label"
        out.append(Entry("label", subject, label, path))
    return out, problems


def read_table(table: Path) -> list[Entry]:
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
                if kind not in KINDS:
                    raise ManifestError(table, f"line {line}: kind must be one of {KINDS}")
                if not subject or not rel or (kind != "landmarks" and not name):
                    raise ManifestError(table, f"line {line}: empty subject, modality or path")
                path = Path(rel).expanduser()
                if not path.is_absolute():
                    path = table.parent / path
                entries.append(Entry(kind, subject, name if kind != "landmarks" else "", path))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(table, f"cannot read table: {exc}") from exc
    return entries


def _table_entries(table: Path, root: Path) -> tuple[list[Entry], list[Problem]]:
    """The rows of ``table`` that may be read: plain subject ids, files inside the table's
    folder or ``root`` (no ``../`` or absolute escapes)."""
    entries: list[Entry] = []
    problems: list[Problem] = []
    for e in read_table(table):
        if (why := unsafe_subject_id(e.subject)) is not None:
            problems.append(Problem(str(e.path), why, ""))
        elif outside_roots(e.path, [table.parent, root]):
            problems.append(
                Problem(
                    str(e.path),
                    f"path outside the data folders ({table.parent} and {root}); "
                    "pass the folder holding it as the data root",
                    e.subject,
                )
            )
        else:
            entries.append(e)
    return entries, problems


def table_entries(table: Path, root: Path) -> tuple[list[Entry], list[Problem]]:
    """The usable rows of a ``--table`` CSV, and the rows left out (see
    :func:`_table_entries`); "no image files found" when there are none."""
    entries, problems = _table_entries(table, root)
    if not entries:
        problems.append(Problem(str(root), "no image files found"))
    return entries, problems


def group_entries(entries: Iterable[Entry]) -> tuple[dict[str, list[Entry]], list[Problem]]:
    """Entries per subject; of duplicates (same subject, kind and name) the first in sorted
    path order is kept and the others become problems."""
    problems: list[Problem] = []
    by_key: dict[tuple[str, str, str], Entry] = {}
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
    per_subject: dict[str, list[Entry]] = {}
    for e in by_key.values():
        per_subject.setdefault(e.subject, []).append(e)
    return per_subject, problems
