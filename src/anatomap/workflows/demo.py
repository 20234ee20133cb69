"""``anatomap demo``: the whole pipeline on the embedded demo data, as a user would run it.

build demo scans -> index the folder -> cache (RAS+, 2 mm, MRI preset) -> pretrain ISImed ->
evaluate against a random encoder -> ``report.html`` -> match landmarks into unseen scans
with the shipped ``brain-mri`` model against SimpleITK rigid+affine registration.

The demo scans are an honest test (issue 14): synthetic subjects drawn from the MNI152
label maps (:mod:`anatomap.data.synth`); training subjects get the training contrast
families, the held-out ones only :data:`~anatomap.eval.transfer.HELD_OUT_CONTRASTS` (T2-,
PD-, FLAIR-, CT-like), larger deformations and, half of them, a field of view cut through
the brain. ``modalities`` other than ``("T1w",)`` build the multi-modal template demo of
:mod:`anatomap.data.demo` instead (topo). Idempotent: scans, manifest and cache are reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anatomap.api import load_config
from anatomap.data.cache import build_cache
from anatomap.data.demo import build_demo
from anatomap.data.manifest import index_directory, write_manifest
from anatomap.data.synth.cohort import render_modalities
from anatomap.errors import AnatomapError
from anatomap.eval.evaluate import EvalResult, evaluate
from anatomap.train.pretrain import pretrain

DEMO_MODALITY = "synth"
"""Modality name of the synthetic demo's images (their contrast varies per subject)."""

HELDOUT_DEFORMATION = {"svf_max_mm": [14.0, 7.0], "fov_cut_probability": 0.5}
"""Held-out demo subjects: larger deformations than training's [10, 5] mm, and half of them
with a field of view cut through the brain."""


def _synthetic_cohort(
    data_dir: Path, n: int, n_heldout: int, spacing: float, renders: int, progress: bool, log
) -> Path:
    """The synthetic demo cohort (issue 14's honest test); returns its ``splits.csv``."""
    from anatomap.data.synth import SynthConfig, write_synth_cohort
    from anatomap.eval.transfer import HELD_OUT_CONTRASTS

    train_cfg = SynthConfig(spacing=spacing, renders=renders)
    res = write_synth_cohort(
        data_dir,
        n,
        None,
        train_cfg,
        seed=0,
        n_heldout=n_heldout,
        held_out_contrasts=HELD_OUT_CONTRASTS,
        heldout_config=train_cfg.model_copy(update=HELDOUT_DEFORMATION),
        modality=DEMO_MODALITY,
        progress=progress,
    )
    held = ", ".join(f"{s} {res.contrasts[s]}" for s in res.heldout)
    log(f"      {len(res.subjects)} subjects; held out (contrasts never trained on): {held}")
    return res.root / "splits.csv"


@dataclass
class DemoResult:
    out: Path
    report: Path
    evaluation: EvalResult
    matching: list[str] | None = None  # the matching table's lines (step 6)


def prepare_demo(
    out: Path,
    *,
    n_subjects: int = 16,
    n_heldout: int = 4,
    spacing: float = 2.0,
    progress: bool = True,
    log=print,
    steps: int = 5,
    modalities: tuple[str, ...] = ("T1w",),
    synthetic: bool | None = None,
    renders: int = 1,
) -> tuple[Path, Path]:
    """Demo scans, manifest and cache under ``out`` (reused when present).

    ``synthetic`` (default: when ``modalities`` is ``("T1w",)``): the synthetic demo with
    ``renders`` contrasts of each subject as channels (named :data:`DEMO_MODALITY`,
    ``synth2``, ...; held-out subjects get held-out contrasts in every channel); else the
    template demo with ``modalities``: T1w plus template contrasts (``T2w``, ``FLAIR``).
    The cache holds exactly these channels.
    Returns the cache folder and the ``subjects.csv`` that marks the held-out subjects.
    """
    data_dir = out / "data"
    if synthetic is None:
        synthetic = tuple(modalities) == ("T1w",)
    if synthetic:
        log(f"[1/{steps}] synthetic demo scans -> {data_dir}")
        split = _synthetic_cohort(data_dir, n_subjects, n_heldout, spacing, renders, progress, log)
        modalities = tuple(render_modalities(DEMO_MODALITY, renders))
    else:
        log(f"[1/{steps}] demo scans -> {data_dir} ({', '.join(modalities)})")
        info = build_demo(
            data_dir,
            n_subjects=n_subjects,
            n_heldout=n_heldout,
            spacing=spacing,
            progress=progress,
            modalities=modalities,
        )
        split = data_dir / "subjects.csv"
        log(f"      {len(info.subjects)} subjects ({len(info.heldout)} held out)")

    log(f"[2/{steps}] index -> {out / 'manifest.jsonl'}")
    indexed = index_directory(data_dir, progress=progress)
    if indexed.problems:
        for p in indexed.problems:
            log(f"      rejected {p.path}: {p.reason}")
    if not indexed.subjects:
        raise AnatomapError(f"{data_dir}: no usable scans in the demo folder")
    write_manifest(indexed, out / "manifest.jsonl")
    log(f"      {len(indexed.subjects)} subjects indexed")

    log(f"[3/{steps}] cache -> {out / 'cache'} (RAS+, {spacing} mm, MRI preset)")
    cached = build_cache(
        out / "manifest.jsonl",
        out / "cache",
        preset="mri",
        spacing=spacing,
        progress=progress,
        modalities=list(modalities),
    )
    log(f"      built {cached.built}, reused {cached.reused}")
    return out / "cache", split


def run_demo(
    out: str | Path = "demo_out",
    *,
    config: str = "demo",
    n_subjects: int = 16,
    n_heldout: int = 4,
    spacing: float = 2.0,
    overrides: list[str] | None = None,
    progress: bool = True,
    log=print,
    modalities: tuple[str, ...] = ("T1w",),
    evaluate_options: dict | None = None,
    matching: bool = True,
) -> DemoResult:
    """Run the demo end to end into ``out``; returns the report path and the metrics.

    ``config`` names the recipe (``demo``: ISImed, run folder ``runs/isimed``; any other
    name or YAML path trains into ``runs/<its stem>``). ``modalities`` as in
    :func:`prepare_demo`; ``evaluate_options`` go to :func:`evaluate` (e.g. ``compare``);
    ``matching``: step 6, :func:`demo_matching`.
    """
    out = Path(out)
    cache_dir, subjects_csv = prepare_demo(
        out,
        n_subjects=n_subjects,
        n_heldout=n_heldout,
        spacing=spacing,
        progress=progress,
        log=log,
        steps=6 if matching else 5,
        modalities=tuple(modalities),
    )
    run_dir = out / "runs" / ("isimed" if config == "demo" else Path(config).stem)
    cfg = load_config(
        config,
        [
            f"data.cache={cache_dir}",
            f"data.heldout_file={subjects_csv}",
            f"output={run_dir}",
            f"trainer.progress={'true' if progress else 'false'}",
            *(overrides or []),
        ],
    )
    method = "ISImed" if cfg.objective.name == "isimed" else cfg.objective.name
    steps = 6 if matching else 5
    log(f"[4/{steps}] pretrain {method} -> {run_dir} ({cfg.trainer.max_steps} steps)")
    pretrain(cfg, overwrite=True)

    log(f"[5/{steps}] evaluate -> {run_dir / 'eval'}")
    result = evaluate(run_dir, progress=progress, **(evaluate_options or {}))
    table = None
    if matching:
        log(f"[6/{steps}] match landmarks into unseen scans: brain-mri vs rigid+affine")
        table = demo_matching(log=log)
    return DemoResult(out, result.report, result, table)


def demo_matching(
    n_targets: int = 1, max_points: int = 50, log=print, model: str = "brain-mri"
) -> list[str]:
    """The shipped ``model`` against SimpleITK rigid+affine registration (rigid stage first:
    plain affine fails on partial fields of view) on held-out targets of every condition of
    :data:`anatomap.eval.transfer.CONDITIONS` (synthetic subjects in contrasts never
    trained on, and the real MNI152 T1 under warps; full and partial field of view). Seconds
    per target include the target's embedding. Returns the table's lines."""
    from anatomap.checkpoint import load_model
    from anatomap.eval.matchers import matcher_for
    from anatomap.eval.registration import RigidAffineRegistration
    from anatomap.eval.transfer import run_transfer, summary_table

    encoder, objective, meta = load_model(model)
    matchers = [matcher_for(model, encoder, objective, meta), RigidAffineRegistration()]
    results = run_transfer(matchers, n_targets=n_targets, max_points=max_points, log=log)
    return summary_table(results, [m.name for m in matchers])
