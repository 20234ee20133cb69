"""DICOM trees (``PATIENT/STUDY/SERIES/*.dcm``, or any other nesting): one entry per series.

Every file's header is read (tags only, no pixels). Files are grouped by folder and
SeriesInstanceUID, so a folder holding several series gives several entries.

* Subject: the PatientID (made a plain name), with the study's date (or ``study<k>``) after
  it when the patient has several studies; the top folder's name when PatientID is empty.
* Modality: the series' own Modality tag (``CT``, ``MR``); when a subject has several series
  of one modality, their SeriesDescription (or SeriesNumber) is added: ``MR_T2_AX``.
* Localizer (scout) series are skipped with a note, and so is DICOMDIR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from anatomap.data.discovery import Entry, looks_dicom
from anatomap.data.layouts.base import Detection, Found, Layout, Options
from anatomap.data.walk import Peek, text_id, walk
from anatomap.io.readers import image_suffix

TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "ImageType",
]


def plain(text: str) -> str:
    """``text`` as a plain name: letters, digits, ``.``, ``-``, ``_`` (others become ``_``)."""
    out = re.sub(r"[^A-Za-z0-9.\-]+", "_", text.strip()).strip("._")
    return out


@dataclass
class Series:
    folder: Path
    uid: str
    patient: str
    study: str
    study_date: str
    number: str
    description: str
    modality: str
    files: int = 0


def _header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
    except Exception:
        return None


class Dicom(Layout):
    """A tree of DICOM files (and no NIfTI/NRRD/MetaImage files)."""

    name = "dicom"
    title = "DICOM tree"

    def detect(self, peek: Peek) -> Detection | None:
        files = peek.files()
        if not files or any(image_suffix(p.name) for p in files):
            return None
        for p in files:
            if looks_dicom(p):
                rel = p.relative_to(peek.root)
                return Detection(
                    self.title,
                    f"it holds DICOM files ({rel}) and no NIfTI, NRRD or MetaImage files",
                )
        return None

    def find(self, root: Path, options: Options) -> Found:
        found = Found()
        tree = walk(root)
        found.add_tree(tree)
        series: dict[tuple[Path, str], Series] = {}
        for p in tree.files():
            if image_suffix(p.name):
                found.skip(p, "a NIfTI/NRRD/MetaImage file in a DICOM tree: skipped")
                continue
            if p.name.upper() == "DICOMDIR":
                continue
            ds = _header(p) if looks_dicom(p) else None
            if ds is None:
                continue
            if "LOCALIZER" in [str(t).upper() for t in (ds.get("ImageType") or [])]:
                found.skip(p.parent, "localizer (scout) series: skipped")
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            key = (p.parent, uid)
            if key not in series:
                top = p.relative_to(root).parts[0] if p.parent != root else root.name
                series[key] = Series(
                    p.parent,
                    uid,
                    plain(str(ds.get("PatientID", "") or "")) or plain(top),
                    str(ds.get("StudyInstanceUID", "") or ""),
                    str(ds.get("StudyDate", "") or ""),
                    str(ds.get("SeriesNumber", "") or ""),
                    str(ds.get("SeriesDescription", "") or ""),
                    plain(str(ds.get("Modality", "") or "")) or "image",
                )
            series[key].files += 1
        found.skipped = _dedupe(found.skipped)
        self._name(found, list(series.values()))
        return found

    @staticmethod
    def _name(found: Found, all_series: list[Series]) -> None:
        studies: dict[str, list[tuple[str, str]]] = {}
        for s in all_series:
            key = (s.study_date, s.study)
            if key not in studies.setdefault(s.patient, []):
                studies[s.patient].append(key)
        names: dict[tuple[str, str], list[Series]] = {}
        for s in all_series:
            keys = sorted(studies[s.patient])
            subject = s.patient
            if len(keys) > 1:
                dates = [d for d, _ in keys]
                unique = s.study_date and dates.count(s.study_date) == 1
                suffix = (
                    s.study_date if unique else f"study{keys.index((s.study_date, s.study)) + 1}"
                )
                subject = f"{s.patient}_{suffix}"
            names.setdefault((text_id(subject), s.modality), []).append(s)
        for (subject, modality), group in sorted(names.items()):
            used: set[str] = set()
            for k, s in enumerate(sorted(group, key=lambda s: (s.number.zfill(6), s.uid))):
                name = modality
                if len(group) > 1:
                    name = f"{modality}_{plain(s.description) or s.number or k + 1}"
                if name in used:
                    name = f"{name}_{s.number or k + 1}"
                used.add(name)
                meta = {
                    "series_uid": s.uid,
                    "series_number": s.number,
                    "series_description": s.description,
                    "files": s.files,
                }
                uid = s.uid or None
                found.entries.append(Entry("image", subject, name, s.folder, series=uid, meta=meta))
                found.subject_meta.setdefault(
                    subject,
                    {"patient_id": s.patient, "study_uid": s.study, "study_date": s.study_date},
                )


def _dedupe(notes: list) -> list:
    seen, out = set(), []
    for n in notes:
        if (n.path, n.reason) not in seen:
            seen.add((n.path, n.reason))
            out.append(n)
    return out
