"""BIDS: ``sub-<label>/[ses-<label>/]<datatype>/sub-<label>[_ses-<label>][_<key>-<value>]..._
<suffix>.nii.gz``. Names are parsed here (no pybids needed).

* A subject id is ``sub-01``, or ``sub-01_ses-1`` when the file has a session: each session
  is its own record (its scans share no grid with other sessions), and the record's ``meta``
  holds ``participant`` and ``session``.
* The modality is the suffix with every entity but ``sub``, ``ses`` and ``run`` before it
  (``T1w``, ``acq-mprage_T1w``, ``desc-preproc_T1w``); entities are kept as the image's
  metadata. Of several runs of one modality the lowest is indexed, the others skipped.
* ``_dseg`` and ``_mask`` files are label maps, named by their ``label-``/``desc-`` entity (or
  a bare token such as ``sub-01_tissue_dseg``; else the suffix); ``_probseg`` is skipped.
* Non-anatomical data types (``func``, ``dwi``, ``fmap``, ``perf``, ``eeg``, ...) and 4-D
  images are skipped with a note; so are ``derivatives/`` (unless asked), ``sourcedata/``,
  ``code/``, ``stimuli/`` and ``phenotype/``.
"""

from __future__ import annotations

from pathlib import Path

from anatomap.data.discovery import LANDMARK_SUFFIX, Entry, assign
from anatomap.data.layouts.base import Detection, Found, Layout, Options, nifti_volumes
from anatomap.data.walk import Peek, text_id, walk
from anatomap.io.readers import image_suffix, strip_suffix

NOT_ANATOMICAL = frozenset(
    ["func", "dwi", "fmap", "perf", "eeg", "meg", "ieeg", "beh", "nirs", "motion", "mrs"]
)
LABEL_SUFFIXES = frozenset({"dseg", "mask"})
TOP_SKIPPED = {
    "derivatives": "BIDS derivatives: skipped (pass --derivatives to index them)",
    "sourcedata": "BIDS sourcedata (unconverted data): skipped",
    "code": "BIDS code folder: skipped",
    "stimuli": "BIDS stimuli folder: skipped",
    "phenotype": "BIDS phenotype folder: skipped",
}


def parse_name(stem: str) -> tuple[dict[str, str], list[str], str]:
    """``(entities, bare tokens, suffix)`` of a BIDS file name without extension."""
    tokens = stem.split("_")
    suffix = tokens[-1] if "-" not in tokens[-1] else ""
    entities: dict[str, str] = {}
    bare: list[str] = []
    for t in tokens[:-1] if suffix else tokens:
        key, sep, value = t.partition("-")
        if sep and key and value:
            entities.setdefault(key, value)
        else:
            bare.append(t)
    return entities, bare, suffix


class Bids(Layout):
    """Subjects (and sessions) of a BIDS data set."""

    name = "bids"
    title = "BIDS data set"

    def detect(self, peek: Peek) -> Detection | None:
        top = peek.folder(peek.root)
        subs = [d for d in top.dirs if d.startswith("sub-")]
        if "dataset_description.json" in top.files:
            return Detection(self.title, "dataset_description.json is at the top")
        loose = any(image_suffix(n) for n in top.files)  # BIDS keeps no scans at the top
        if subs and not loose and len(subs) >= len(top.dirs) / 2:
            return Detection(self.title, f"{len(subs)} of {len(top.dirs)} top folders are sub-*")
        return None

    def find(self, root: Path, options: Options) -> Found:
        def skip_dir(path: Path) -> str | None:
            if path.parent != root or (options.derivatives and path.name == "derivatives"):
                return None
            return TOP_SKIPPED.get(path.name)

        found = Found()
        tree = walk(root, skip_dir)
        found.add_tree(tree)
        pending: list[tuple[Path, str]] = []
        for p in tree.files():
            rel = p.relative_to(root).parts
            if p.name.lower().endswith(LANDMARK_SUFFIX):
                pending.append((p, "landmarks"))
            elif image_suffix(p.name):
                self._file(found, p, rel)
        _first_runs(found)
        subjects = sorted({e.subject for e in found.entries if e.kind == "image"})
        attached, more = assign(pending, subjects, ())
        found.entries += attached
        found.problems += more
        return found

    @staticmethod
    def _file(found: Found, p: Path, rel: tuple[str, ...]) -> None:
        stem = strip_suffix(p)
        entities, bare, suffix = parse_name(stem)
        datatype = rel[-2] if len(rel) >= 2 else ""
        if "sub" not in entities or not suffix:
            found.skip(p, "not a BIDS file name (sub-<label>_..._<suffix>): skipped")
            return
        subject = f"sub-{entities['sub']}" + (
            f"_ses-{entities['ses']}" if "ses" in entities else ""
        )
        subject = text_id(subject)
        if datatype in NOT_ANATOMICAL:
            found.skip(p, f"BIDS {datatype}/ data (not anatomical): skipped", subject)
            return
        if suffix == "probseg":
            found.skip(p, "probabilistic segmentation (_probseg): skipped", subject)
            return
        volumes = nifti_volumes(p)
        if volumes is not None and volumes > 1:
            found.skip(p, f"4-D image ({volumes} volumes): skipped", subject)
            return
        meta = {"entities": entities, "datatype": datatype}
        if suffix in LABEL_SUFFIXES:
            name = entities.get("label") or entities.get("desc") or "_".join(bare) or suffix
            found.entries.append(Entry("label", subject, text_id(name), p, meta=meta))
        else:
            keep = [f"{k}-{v}" for k, v in entities.items() if k not in ("sub", "ses", "run")]
            name = "_".join([*keep, *bare, suffix])
            found.entries.append(Entry("image", subject, text_id(name), p, meta=meta))
        info = {"participant": f"sub-{entities['sub']}"}
        if "ses" in entities:
            info["session"] = f"ses-{entities['ses']}"
        found.subject_meta.setdefault(subject, info)


def _run(e: Entry) -> tuple[int, str]:
    run = e.meta.get("entities", {}).get("run", "")
    return (int(run) if run.isdigit() else 0, str(e.path))


def _first_runs(found: Found) -> None:
    """Keep the lowest run of each (subject, kind, name); skip the other runs with a note."""
    best: dict[tuple[str, str, str], Entry] = {}
    for e in sorted(found.entries, key=_run):
        key = (e.subject, e.kind, e.name)
        if key in best:
            found.skip(e.path, "another run of an indexed image: skipped", e.subject)
        else:
            best[key] = e
    found.entries = list(best.values())
