"""``imagesTr`` / ``labelsTr`` / ``imagesTs`` data sets: nnU-Net raw (``case_0000.nii.gz``, a
channel suffix per modality) and the Medical Segmentation Decathlon / AMOS (``case.nii.gz``
without one; MSD's 4-D multi-channel images become one modality per volume)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from anatomap.data.discovery import Entry
from anatomap.data.layouts.base import Detection, Found, Layout, Options, nifti_volumes, read_json
from anatomap.data.walk import Peek, text_id, walk
from anatomap.io.readers import image_suffix, strip_suffix

CHANNEL = re.compile(r"^(.+)_(\d{4})$")


def _image_dirs(names: list[str]) -> list[str]:
    """``imagesTr``, ``imagesTs``, ``imagesVa``, ...: ``images`` and a split name (a bare
    ``images/`` beside ``labels/`` is a flat folder, the demo's)."""
    return [d for d in names if d.lower().startswith("images") and len(d) > len("images")]


def _channel_names(info: dict[str, Any]) -> dict[int, str]:
    """``{index: name}`` from dataset.json's ``channel_names`` (nnU-Net v2) or ``modality``."""
    raw = info.get("channel_names") or info.get("modality") or {}
    out: dict[int, str] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            if str(k).isdigit() and isinstance(v, str) and v.strip():
                out[int(k)] = v.strip().replace("/", "-").replace(" ", "_")
    if len(set(out.values())) != len(out):  # repeated names: keep them apart by index
        out = {k: f"{v}_{k:04d}" for k, v in out.items()}
    return out


def channel_evidence(root: Path, peek: Peek, info: dict[str, Any]) -> tuple[bool, str]:
    """Whether image names end in a channel suffix ``_0000``, and why."""
    if "channel_names" in info:
        return True, "dataset.json lists channel_names (nnU-Net v2)"
    top = peek.folder(root)
    stems: list[str] = []
    labels: set[str] = set()
    for d in top.dirs:
        names = [strip_suffix(n) for n in peek.folder(root / d).files if image_suffix(n)]
        if d.lower().startswith("images"):
            stems += [f"{d}/{n}" for n in names]
        elif d.lower().startswith("labels"):
            labels |= {f"{d[6:].lower()}/{n}" for n in names}
    for s in stems:
        d, n = s.split("/", 1)
        key = f"{d[6:].lower()}/"
        if key + n in labels:
            return False, f"label {n} has the name of image {s} (no channel suffix)"
        m = CHANNEL.match(n)
        if m and key + m.group(1) in labels:
            return True, f"label {m.group(1)} matches image {s} (channel suffix _{m.group(2)})"
    groups: dict[str, set[int]] = {}
    for s in stems:
        m = CHANNEL.match(s.split("/", 1)[1])
        if not m:
            return False, f"{s} has no _NNNN channel suffix"
        groups.setdefault(s.split("/", 1)[0] + "/" + m.group(1), set()).add(int(m.group(2)))
    contiguous = all(g == set(range(len(g))) for g in groups.values())
    if groups and contiguous and (len(groups) > 1 or len(next(iter(groups.values()))) <= 4):
        return True, "every case has channels _0000, _0001, ... and no more"
    return False, "the _NNNN endings number the cases, not channels"


class Decathlon(Layout):
    """``images*`` / ``labels*`` folders at the top (``Tr``, ``Ts``, ``Va``), ``dataset.json``
    when there is one. ``mode`` ``nnunet``: names end in a channel suffix; ``msd``: they
    do not."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = mode  # type: ignore[misc]
        self.title = (  # type: ignore[misc]
            "nnU-Net raw data set" if mode == "nnunet" else "Medical Segmentation Decathlon layout"
        )

    def detect(self, peek: Peek) -> Detection | None:
        dirs = _image_dirs(peek.folder(peek.root).dirs)
        if not dirs:
            return None
        info = read_json(peek.root / "dataset.json")
        channels, why = channel_evidence(peek.root, peek, info)
        if channels != (self.mode == "nnunet"):
            return None
        title = self.title
        if self.mode == "msd" and "amos" in str(info.get("name", "")).lower():
            title = "AMOS (Decathlon-style) layout"
        return Detection(title, f"{'/, '.join(dirs)}/ at the top, and {why}")

    def find(self, root: Path, options: Options) -> Found:
        found = Found()
        tree = walk(root)
        found.add_tree(tree)
        names = _channel_names(read_json(root / "dataset.json"))
        for folder in tree.folders:
            parts = folder.path.relative_to(root).parts
            low = parts[0].lower() if parts else ""
            for p in folder.file_paths():
                if not image_suffix(p.name):
                    continue
                if len(parts) != 1 or not low.startswith(("images", "labels")):
                    found.skip(p, "not directly in an images*/ or labels*/ folder: skipped")
                    continue
                split = parts[0][6:]
                stem = strip_suffix(p)
                if low.startswith("labels"):
                    found.entries.append(Entry("label", text_id(stem), "label", p))
                    continue
                for e in self._images(p, stem, names):
                    found.entries.append(e)
                    found.subject_meta.setdefault(e.subject, {})["split"] = split
        return found

    def _images(self, p: Path, stem: str, names: dict[int, str]) -> list[Entry]:
        m = CHANNEL.match(stem)
        if self.mode == "nnunet" and m:
            c = int(m.group(2))
            return [Entry("image", text_id(m.group(1)), names.get(c, m.group(2)), p)]
        case = text_id(stem)
        n = nifti_volumes(p) or 1
        if n == 1:
            return [Entry("image", case, names.get(0, "image"), p)]
        return [Entry("image", case, names.get(c, f"{c:04d}"), p, volume_index=c) for c in range(n)]
