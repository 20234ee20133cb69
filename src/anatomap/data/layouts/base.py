"""What every layout shares: the :class:`Layout` interface, its options and its findings."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from anatomap.data.discovery import DEFAULT_LABEL_SUFFIXES, Entry
from anatomap.data.records import Problem
from anatomap.data.walk import Peek, Tree

MAX_JSON_BYTES = 16 << 20  # a dataset.json larger than this is not read


@dataclass
class Options:
    """How to read a layout: label suffixes (flat names), BIDS derivatives or not."""

    label_suffixes: Sequence[str] = DEFAULT_LABEL_SUFFIXES
    derivatives: bool = False


@dataclass
class Detection:
    """Why a layout applies: a title (``TotalSegmentator-style folder per subject``) and a
    reason (``s0001/ holds ct.nii.gz and a segmentations/ folder``)."""

    title: str
    reason: str


@dataclass
class Found:
    """What a layout made of a folder: entries, files left out on purpose (``skipped``),
    files that could not be used (``problems``) and per-subject metadata."""

    entries: list[Entry] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    subject_meta: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_tree(self, tree: Tree) -> None:
        self.skipped += tree.skipped
        self.problems += tree.problems

    def skip(self, path: Path | str, reason: str, subject: str = "") -> None:
        self.skipped.append(Problem(str(path), reason, subject))


class Layout:
    """One way of laying out a data set: ``detect`` says whether (and why) it applies to a
    folder, ``find`` names its files as :class:`Entry` objects."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""

    def detect(self, peek: Peek) -> Detection | None:
        raise NotImplementedError

    def find(self, root: Path, options: Options) -> Found:
        raise NotImplementedError


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON object (``dataset.json``), or ``{}`` when it is absent or not usable."""
    try:
        if not path.is_file() or os.path.getsize(path) > MAX_JSON_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def nifti_volumes(path: Path) -> int | None:
    """Volumes along the 4th axis of a NIfTI file, read from its header (1 for 3-D images),
    or ``None`` for other formats and unreadable headers (the reader then decides)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        import nibabel as nib

        shape = nib.load(str(path)).header.get_data_shape()
    except Exception:
        return None
    return int(shape[3]) if len(shape) >= 4 else 1
