"""Flat folders: every file named ``<subject>_<modality>`` (anywhere below the root), IXI's
``<subject>-<modality>`` names, label maps by suffix or ``labels*`` folder, DICOM folders."""

from __future__ import annotations

import re
from pathlib import Path

from anatomap.data.discovery import (
    LANDMARK_SUFFIX,
    Entry,
    assign,
    dicom_modality,
    looks_dicom,
    split_name,
)
from anatomap.data.layouts.base import Detection, Found, Layout, Options
from anatomap.data.walk import Peek, walk
from anatomap.io.readers import image_suffix, strip_suffix

IXI = re.compile(r"^(IXI\d+-[A-Za-z]+-\d+)-(.+)$")


class Flat(Layout):
    """Today's naming rules (see :mod:`anatomap.data.discovery`), the fallback layout."""

    name = "flat"
    title = "flat folder"

    def detect(self, peek: Peek) -> Detection:
        sample = [p for p in peek.files() if image_suffix(p.name)]
        ixi = [p for p in sample if IXI.match(strip_suffix(p.name))]
        if ixi:
            return Detection(
                "IXI-style flat folder",
                f"file names look like {ixi[0].name} (<subject>-<modality>)",
            )
        return Detection(
            "flat folder",
            "no other layout matched, so file names are split at the last '_' "
            "(<subject>_<modality>)",
        )

    def find(self, root: Path, options: Options) -> Found:
        found = Found()
        tree = walk(root)
        found.add_tree(tree)
        suffixes = {s.lower() for s in options.label_suffixes}
        pending: list[tuple[Path, str]] = []
        for folder in tree.folders:
            d = folder.path
            if any(looks_dicom(d / n) for n in folder.files if image_suffix(n) is None):
                found.entries.append(Entry("image", d.name, dicom_modality(d), d))
            in_label_dir = d.name.lower().startswith("labels")
            for n in folder.files:
                f = d / n
                if n.lower().endswith(LANDMARK_SUFFIX):
                    pending.append((f, "landmarks"))
                elif image_suffix(n) is not None:
                    self._file(found, pending, f, suffixes, in_label_dir)
        subjects = sorted({e.subject for e in found.entries})
        attached, more = assign(pending, subjects, options.label_suffixes)
        found.entries += attached
        found.problems += more
        return found

    @staticmethod
    def _file(
        found: Found,
        pending: list[tuple[Path, str]],
        f: Path,
        suffixes: set[str],
        in_label_dir: bool,
    ) -> None:
        stem = strip_suffix(f)
        m = IXI.match(stem)
        if m and m.group(2).upper().startswith("DTI"):
            found.skip(f, "IXI diffusion (DTI) volume: not anatomical, skipped", m.group(1))
            return
        subject, token = (m.group(1), m.group(2)) if m else split_name(stem)
        if (token.lower() in suffixes and (stem != subject)) or in_label_dir:
            pending.append((f, "label"))
        else:
            found.entries.append(Entry("image", subject, token, f))
