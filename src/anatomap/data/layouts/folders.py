"""One folder per subject: TotalSegmentator (``s0001/ct.nii.gz`` + ``s0001/segmentations/
liver.nii.gz``), KiTS (``case_00000/imaging.nii.gz`` + ``segmentation.nii.gz``), BraTS 2021 and
2023 (``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz``, ``...-seg.nii.gz``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from anatomap.data.discovery import LANDMARK_SUFFIX, Entry, dicom_modality, looks_dicom
from anatomap.data.layouts.base import Detection, Found, Layout, Options
from anatomap.data.walk import Folder, Peek, text_id, walk
from anatomap.io.readers import image_suffix, strip_suffix

LABEL_DIRS = frozenset(
    [
        "segmentations",
        "segmentation",
        "segs",
        "seg",
        "labels",
        "label",
        "masks",
        "mask",
        "ground_truth",
        "gt",
    ]
)
LABEL_WORDS = frozenset(
    [
        "seg",
        "segmentation",
        "label",
        "labels",
        "mask",
        "dseg",
        "gt",
        "groundtruth",
        "ground_truth",
        "aseg",
    ]
)
NESTED = (
    "in a nested folder of a subject (only the subject's folder and its segmentations/ "
    "folder are read): skipped"
)
MAX_LOOK = 64  # subfolders looked at to detect the layout


def modality_token(stem: str, subject: str) -> str:
    """The part of ``stem`` after the subject's name and a separator (BraTS), else ``stem``."""
    for sep in "_-.":
        if stem.startswith(subject + sep) and len(stem) > len(subject) + 1:
            return stem[len(subject) + 1 :]
    return stem


def label_name(token: str, suffixes: set[str]) -> str | None:
    """The label name of a file in a subject folder (``seg``, ``segmentation``, ``liver`` of
    ``liver_seg``), or ``None`` when the file is an image."""
    if token.lower() in LABEL_WORDS | suffixes:
        return token
    head, _, last = token.rpartition("_")
    if head and last.lower() in LABEL_WORDS | suffixes:
        return head
    return None


class FolderPerSubject(Layout):
    """Each subfolder of the root is a subject; its images, label files, ``segmentations/``
    masks (one label per structure) and ``landmarks.csv``."""

    name = "folder-per-subject"
    title = "folder per subject"

    def detect(self, peek: Peek) -> Detection | None:
        top = peek.folder(peek.root)
        if any(image_suffix(n) for n in top.files) or not top.dirs:
            return None
        subs: list[tuple[str, Folder, list[str]]] = []
        for d in top.dirs[:MAX_LOOK]:
            f = peek.folder(peek.root / d)
            images = [n for n in f.files if image_suffix(n)]
            if images:
                subs.append((d, f, images))
        if not subs:
            return None
        d, f, images = subs[0]
        if all(
            modality_token(strip_suffix(n), s) != strip_suffix(n) for s, _, im in subs for n in im
        ):
            style = "BraTS-style " if any(s.lower().startswith("brats") for s, _, _ in subs) else ""
            return Detection(
                f"{style}folder per subject",
                f"file names start with their folder's name ({d}/{images[0]})",
            )
        for s, f, im in subs:
            masks = [x for x in f.dirs if x.lower() in LABEL_DIRS]
            if masks:
                return Detection(
                    "TotalSegmentator-style folder per subject",
                    f"{s}/ holds {im[0]} and a {masks[0]}/ folder of per-structure masks",
                )
        counts = Counter(n for _, _, im in subs for n in im)
        shared = sorted(n for n, c in counts.items() if c >= 2)
        if len(subs) >= 2 and shared:
            style = "KiTS-style " if any(strip_suffix(n) == "imaging" for n in shared) else ""
            return Detection(
                f"{style}folder per subject",
                f"the same file names ({', '.join(shared[:3])}) recur in "
                f"{sum(any(n in shared for n in im) for _, _, im in subs)} of {len(subs)} "
                "subfolders",
            )
        return None

    def find(self, root: Path, options: Options) -> Found:
        found = Found()
        tree = walk(root)
        found.add_tree(tree)
        suffixes = {s.lower() for s in options.label_suffixes}
        for folder in tree.folders:
            parts = folder.path.relative_to(root).parts
            if not parts:
                for p in folder.file_paths():
                    if image_suffix(p.name):
                        found.skip(p, "image outside any subject folder: skipped")
                continue
            subject = text_id(parts[0])
            if len(parts) == 1:
                self._subject_files(found, folder, subject, suffixes)
            elif len(parts) == 2 and parts[1].lower() in LABEL_DIRS:
                for p in folder.file_paths():
                    if image_suffix(p.name):
                        name = modality_token(strip_suffix(p), parts[0])
                        found.entries.append(Entry("label", subject, text_id(name), p))
            elif any(looks_dicom(p) for p in folder.file_paths() if not image_suffix(p.name)):
                modality = dicom_modality(folder.path)
                found.entries.append(Entry("image", subject, modality, folder.path))
            else:
                for p in folder.file_paths():
                    if image_suffix(p.name):
                        found.skip(p, NESTED, subject)
        return found

    @staticmethod
    def _subject_files(found: Found, folder: Folder, subject: str, suffixes: set[str]) -> None:
        for p in folder.file_paths():
            low = p.name.lower()
            if low == "landmarks.csv" or low.endswith(LANDMARK_SUFFIX):
                found.entries.append(Entry("landmarks", subject, "", p))
                continue
            if not image_suffix(p.name):
                continue
            token = modality_token(strip_suffix(p), folder.path.name)
            label = label_name(token, suffixes)
            if label is not None:
                found.entries.append(Entry("label", subject, text_id(label), p))
            else:
                found.entries.append(Entry("image", subject, text_id(token), p))
