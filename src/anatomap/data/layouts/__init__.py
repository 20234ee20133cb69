"""Data set layouts that ``anatomap data index`` recognises, and how it picks one.

Each layout is a small class (:class:`~anatomap.data.layouts.base.Layout`) with ``detect``
(a :class:`Detection`: title and reason, or ``None``) and ``find`` (the folder's entries).
:func:`discover` tries them in the order of :data:`LAYOUTS` (the most specific first; the flat
rules always apply) unless one is named. docs/data-formats.md shows each with an example.
"""

from __future__ import annotations

from pathlib import Path

from anatomap.data.layouts.base import Detection, Found, Layout, Options
from anatomap.data.layouts.bids import Bids
from anatomap.data.layouts.decathlon import Decathlon
from anatomap.data.layouts.dicom import Dicom
from anatomap.data.layouts.flat import Flat
from anatomap.data.layouts.folders import FolderPerSubject
from anatomap.data.walk import Peek, text_id
from anatomap.errors import ConfigError

__all__ = ["LAYOUTS", "Detection", "Found", "Layout", "Options", "detect", "discover"]

LAYOUTS: tuple[Layout, ...] = (
    Bids(),
    Decathlon("nnunet"),
    Decathlon("msd"),
    Dicom(),
    FolderPerSubject(),
    Flat(),
)
LAYOUT_NAMES = ("auto", *(layout.name for layout in LAYOUTS))


def get_layout(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise ConfigError(f"unknown layout '{name}'; choose one of {', '.join(LAYOUT_NAMES)}")


def detect(root: Path, layout: str = "auto") -> tuple[Layout, Detection]:
    """The layout of ``root`` and why: the first in :data:`LAYOUTS` that matches, or the one
    named (``layout``)."""
    if layout != "auto":
        chosen = get_layout(layout)
        return chosen, Detection(chosen.title, f"--layout {layout} was given")
    peek = Peek(root)
    for candidate in LAYOUTS:
        found = candidate.detect(peek)
        if found is not None:
            return candidate, found
    raise AssertionError("the flat layout always matches")  # pragma: no cover


def discover(
    root: Path, layout: str = "auto", options: Options | None = None
) -> tuple[Found, Layout, Detection]:
    """The entries of ``root`` under its layout (detected, or named by ``layout``). Subject
    ids and names become plain text (:func:`~anatomap.data.walk.text_id`)."""
    chosen, why = detect(root, layout)
    found = chosen.find(root, options or Options())
    for e in found.entries:
        e.subject, e.name = text_id(e.subject), text_id(e.name)
    if not any(e.kind == "image" for e in found.entries):
        from anatomap.data.records import Problem

        found.problems.append(Problem(str(root), "no image files found"))
    return found, chosen, why
