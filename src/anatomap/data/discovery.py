"""Discovery: find the scans, label maps, landmark files and DICOM series of a data folder.

:func:`find_entries` walks a folder (or reads a ``subject,modality,path[,kind]`` table) and
names every file it finds as an :class:`Entry`; :func:`group_entries` drops duplicates and
groups them per subject. Nothing is read here beyond DICOM headers:
:func:`anatomap.data.manifest.index_directory` validates the entries.

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
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from anatomap.data.records import ManifestError, Problem, unsafe_subject_id
from anatomap.io.readers import image_suffix, strip_suffix

LANDMARK_SUFFIX = "_landmarks.csv"
DEFAULT_LABEL_SUFFIXES = ("dseg", "seg", "label", "labels")
KINDS = ("image", "label", "landmarks")


@dataclass
class Entry:
    """One file (or DICOM folder) found, before it is read."""

    kind: str  # image | label | landmarks
    subject: str
    name: str  # modality (images), label name (labels), "" (landmarks)
    path: Path


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


def match_subject(name: str, subjects: Sequence[str]) -> str | None:
    """The longest subject id that is ``name`` or a ``_``-delimited prefix of it."""
    best = None
    for s in subjects:
        if (name == s or name.startswith(s + "_")) and (best is None or len(s) > len(best)):
            best = s
    return best


def walk_folder(
    root: Path, label_suffixes: Sequence[str]
) -> tuple[list[Entry], list[tuple[Path, str]], list[Problem]]:
    """Walk ``root``: image entries, unassigned (label|landmarks, path), problems."""
    suffixes = {s.lower() for s in label_suffixes}
    entries: list[Entry] = []
    pending: list[tuple[Path, str]] = []
    problems: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        files = sorted(n for n in filenames if not n.startswith("."))
        if not dirnames and not files and d != root:
            problems.append(Problem(str(d), "empty folder (no files)"))
            continue
        if any(looks_dicom(d / n) for n in files if image_suffix(n) is None):
            entries.append(Entry("image", d.name, dicom_modality(d), d))
        in_label_dir = d.name.lower().startswith("labels")
        for n in files:
            f = d / n
            if n.lower().endswith(LANDMARK_SUFFIX):
                pending.append((f, "landmarks"))
                continue
            if image_suffix(n) is None:
                continue
            stem = strip_suffix(n)
            subject, token = split_name(stem)
            if ("_" in stem and token.lower() in suffixes) or in_label_dir:
                pending.append((f, "label"))
            else:
                entries.append(Entry("image", subject, token, f))
    return entries, pending, problems


def assign(
    pending: Iterable[tuple[Path, str]], subjects: Sequence[str], label_suffixes: Sequence[str]
) -> tuple[list[Entry], list[Problem]]:
    """Attach label maps and landmark files to the image subject their name starts with."""
    suffixes = {s.lower() for s in label_suffixes}
    out: list[Entry] = []
    problems: list[Problem] = []
    for path, kind in pending:
        name = path.name[: -len(LANDMARK_SUFFIX)] if kind == "landmarks" else strip_suffix(path)
        subject = match_subject(name, subjects)
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


def find_entries(
    root: Path, table: Path | None, label_suffixes: Sequence[str]
) -> tuple[list[Entry], list[Problem]]:
    """Every file under ``root`` (or listed in ``table``) named by the rules above, and the
    files that could not be placed. Both paths are absolute."""
    if table is not None:
        entries, problems = _table_entries(table, root)
    else:
        if not root.is_dir():
            raise ManifestError(root, "not a folder")
        images, pending, problems = walk_folder(root, label_suffixes)
        subject_ids = sorted({e.subject for e in images})
        attached, more = assign(pending, subject_ids, label_suffixes)
        entries = images + attached
        problems += more
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
