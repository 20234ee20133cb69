"""Materialised synthetic cohorts: a folder that ``anatomap data index`` reads like a user's.

Layout (``NAME`` = ``sub-000``, ``sub-001``, ...)::

    OUT/images/NAME_<modality>.nii.gz        float32 image (HU for the ct family); with
                                             ``renders`` > 1 also NAME_<modality>2, 3, ...
                                             (other contrasts, same deformation and grid)
    OUT/labels/NAME_<label>_dseg.nii.gz      each label map of the source (tissue, aal, ...)
    OUT/landmarks/NAME_landmarks.csv         name,x,y,z (subject world mm), those in view
    OUT/params/NAME.json                     everything drawn (SynthParams) + the request
    OUT/splits.csv                           subject,split,contrast,source (data.heldout_file)
    OUT/synth.json                           the request: n, seed, configs, sources
    OUT/labels_<label>.csv                   value,name of each label map
    OUT/landmarks_template.csv               the source's landmarks (one source only)

Subject ``i`` is ``synth_subject(source, config, [seed, i])``: the one
:class:`~anatomap.data.synth.SynthViewDataset` renders at index ``i`` with the same seed.
Every file goes through :mod:`anatomap.io.atomic` (or :func:`anatomap.io.write_volume`); a
subject's ``params`` JSON is written last, so a rerun skips finished subjects and redoes
interrupted ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anatomap.data.synth.config import FAMILIES, SynthConfig
from anatomap.data.synth.source import LabelSource
from anatomap.data.synth.subject import SynthSubject, _sources, synth_subject
from anatomap.data.volume import Volume
from anatomap.errors import ConfigError
from anatomap.geometry.fields import WorldMap
from anatomap.io import write_volume
from anatomap.io.atomic import atomic_write_json, atomic_write_text

_SUBJECT_RE = re.compile(r"^(sub-\d+)[_.]")
GENERATOR_VERSION = 1
"""Bumped whenever the generator's output changes: written subjects are then redrawn."""


@dataclass(frozen=True)
class SynthCohort:
    """What :func:`write_synth_cohort` produced (``written`` + ``reused`` = subjects)."""

    root: Path
    subjects: list[str]
    train: list[str]
    heldout: list[str]
    contrasts: dict[str, str]
    written: int
    reused: int


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    clean = [[str(v).replace(",", " ") for v in r] for r in rows]
    return "\n".join(",".join(r) for r in [list(header), *clean]) + "\n"


def _landmark_text(names: Sequence[str], xyz: np.ndarray) -> str:
    return _csv_text(
        ["name", "x", "y", "z"],
        [[n, *(f"{v:.4f}" for v in p)] for n, p in zip(names, xyz, strict=True)],
    )


def _split_config(
    config: SynthConfig, heldout: bool, held_out: Sequence[str], other: SynthConfig | None
) -> SynthConfig:
    """Training subjects never see ``held_out`` families; held-out subjects use only them."""
    cfg = (other or config) if heldout else config
    if heldout and other is None and cfg.renders > 1:  # evaluation subjects: one contrast
        cfg = SynthConfig.model_validate({**cfg.model_dump(), "renders": 1})
    if not held_out:
        return cfg
    allowed = list(held_out) if heldout else [c for c in cfg.contrasts if c not in held_out]
    if not allowed:
        raise ConfigError("held_out_contrasts leave no contrast family for training subjects")
    return SynthConfig.model_validate({**cfg.model_dump(), "contrasts": allowed})


def render_modalities(modality: str, renders: int) -> list[str]:
    """File modality names of a subject's renders: ``modality`` for the first, then
    ``modality2``, ``modality3``, ... (``anatomap data cache`` sees them as modalities)."""
    return [modality] + [f"{modality}{r + 1}" for r in range(1, renders)]


def _write_subject(root: Path, sid: str, sub: SynthSubject, modality: str, request: dict) -> None:
    names = render_modalities(modality, len(sub.images))
    images = root / "images"
    if images.is_dir():  # renders an earlier request wrote that this one does not
        keep = {f"{sid}_{n}.nii.gz" for n in names}
        for f in images.glob(f"{sid}_*.nii.gz"):
            if f.name not in keep:
                f.unlink()
    for name, image in zip(names, sub.images, strict=True):
        write_volume(Volume(image, sub.affine, name, sid), root / "images" / f"{sid}_{name}.nii.gz")
    for name, lab in sub.labels.items():
        arr = lab.astype(np.int16 if lab.max(initial=0) < 2**15 else np.int32)
        write_volume(
            Volume(arr, sub.affine, name, sid), root / "labels" / f"{sid}_{name}_dseg.nii.gz"
        )
    names, xyz = sub.landmarks
    path = root / "landmarks" / f"{sid}_landmarks.csv"
    if names:  # a table without rows would not index
        atomic_write_text(path, _landmark_text(names, xyz))
    else:
        path.unlink(missing_ok=True)
    record = {"request": request, "n_landmarks": len(names), "params": sub.params.to_dict()}
    atomic_write_json(root / "params" / f"{sid}.json", record)


def _contrasts(params: dict[str, Any]) -> str:
    """The subject's contrast families, ``+``-joined over its renders (``t1+gmm``)."""
    return "+".join([params["contrast"], *(r["contrast"] for r in params.get("extra_renders", []))])


def _check_request(n: int, n_heldout: int, held_out: Sequence[str], modality: str) -> None:
    if not 0 <= n_heldout <= n:
        raise ValueError(f"need 0 <= n_heldout <= n, got {n_heldout}, {n}")
    bad = [c for c in held_out if c not in FAMILIES]
    if bad:
        raise ConfigError(f"unknown contrast families {bad}; choose from {FAMILIES}")
    if "_" in modality or not modality:
        raise ConfigError(f"modality {modality!r} must be a non-empty name without '_'")


def _write_tables(root: Path, sources: Sequence[LabelSource], rows: list[list[str]]) -> None:
    """``splits.csv``, ``labels_<name>.csv`` and (one source) ``landmarks_template.csv``."""
    header = ["subject", "split", "contrast", "source"]
    atomic_write_text(root / "splits.csv", _csv_text(header, rows))
    for name, table in sources[0].label_names.items():
        text = _csv_text(["value", "name"], sorted(table.items()))
        atomic_write_text(root / f"labels_{name}.csv", text)
    if len(sources) == 1 and len(sources[0].landmark_names):
        text = _landmark_text(sources[0].landmark_names, sources[0].landmark_mm)
        atomic_write_text(root / "landmarks_template.csv", text)


def _remove_stale(root: Path, keep: set[str]) -> None:
    """Delete the files of ``sub-N`` subjects an earlier, larger build wrote."""
    for folder in ("images", "labels", "landmarks", "params"):
        if (root / folder).is_dir():
            for f in (root / folder).iterdir():
                m = _SUBJECT_RE.match(f.name)
                if m and m.group(1) not in keep:
                    f.unlink()


def _done(root: Path, sid: str, request: dict) -> dict | None:
    try:
        record = json.loads((root / "params" / f"{sid}.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("request") == request else None


def write_synth_cohort(
    out_dir: str | Path,
    n: int,
    source: LabelSource | Sequence[LabelSource] | None = None,
    config: SynthConfig | None = None,
    seed: int = 0,
    *,
    n_heldout: int = 0,
    held_out_contrasts: Sequence[str] = (),
    heldout_config: SynthConfig | None = None,
    modality: str = "synth",
    progress: bool = False,
) -> SynthCohort:
    """Write ``n`` synthetic subjects into ``out_dir`` (resumable; see the module doc).

    The last ``n_heldout`` subjects form the held-out split (``splits.csv``): they are drawn
    with ``heldout_config`` (default ``config``; e.g. larger deformations, more cut fields of
    view) and only the ``held_out_contrasts`` families, which training subjects never get.
    """
    _check_request(n, n_heldout, held_out_contrasts, modality)
    from tqdm.auto import tqdm

    sources = _sources(source)
    cfg = config or SynthConfig()
    root = Path(out_dir).expanduser().resolve()
    width = max(3, len(str(n - 1)))
    subjects = [f"sub-{i:0{width}d}" for i in range(n)]
    described = [{"name": s.name, "recipe": list(s.recipe or ())} for s in sources]
    _remove_stale(root, set(subjects))
    rows, contrasts, written = [], {}, 0
    for i, sid in enumerate(tqdm(subjects, desc="synth", unit="subject", disable=not progress)):
        heldout = i >= n - n_heldout
        sub_cfg = _split_config(cfg, heldout, held_out_contrasts, heldout_config)
        request = {
            "version": GENERATOR_VERSION,
            "seed": [int(seed), i],
            "config": sub_cfg.model_dump(mode="json"),
            "sources": described,
            "modality": modality,
        }
        request = json.loads(json.dumps(request))  # as read back: lists, not tuples
        record = _done(root, sid, request)
        if record is None:
            sub = synth_subject(sources, sub_cfg, [seed, i])
            _write_subject(root, sid, sub, modality, request)
            written += 1
            contrast, k = _contrasts(sub.params.to_dict()), sub.params.source
        else:
            contrast, k = _contrasts(record["params"]), record["params"]["source"]
        contrasts[sid] = contrast
        rows.append([sid, "heldout" if heldout else "train", contrast, sources[k].name])
    _write_tables(root, sources, rows)
    meta = {
        "version": GENERATOR_VERSION,
        "n": n,
        "n_heldout": n_heldout,
        "seed": seed,
        "held_out_contrasts": list(held_out_contrasts),
        "config": cfg.model_dump(mode="json"),
        "heldout_config": heldout_config.model_dump(mode="json") if heldout_config else None,
        "modality": modality,
        "sources": described,
        "subjects": {r[0]: {"split": r[1], "contrast": r[2], "source": r[3]} for r in rows},
    }
    atomic_write_json(root / "synth.json", meta)
    split = {r[0]: r[1] for r in rows}
    return SynthCohort(
        root=root,
        subjects=subjects,
        train=[s for s in subjects if split[s] == "train"],
        heldout=[s for s in subjects if split[s] == "heldout"],
        contrasts=contrasts,
        written=written,
        reused=n - written,
    )


def load_synth_map(out_dir: str | Path, subject: str) -> WorldMap:
    """A written subject's exact subject world -> template world map (its inverse:
    ``.inverse``), rebuilt from ``params/<subject>.json`` without the source."""
    from anatomap.data.synth.subject import SynthParams

    path = Path(out_dir).expanduser() / "params" / f"{subject}.json"
    return SynthParams.from_dict(json.loads(path.read_text())["params"]).world_map()
