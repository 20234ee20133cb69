"""``anatomap demo``: the whole pipeline on the embedded demo data, as a user would run it.

build demo scans (nilearn's MNI152 + known random transforms) -> index the folder ->
cache (RAS+, 2 mm, MRI preset) -> pretrain ISImed -> evaluate against a random encoder ->
``report.html``. Idempotent: the scans, manifest and cache are reused on a second run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anatomap.api import load_config
from anatomap.data.cache import build_cache
from anatomap.data.demo import build_demo
from anatomap.data.manifest import index_directory, write_manifest
from anatomap.errors import AnatomapError
from anatomap.eval.evaluate import EvalResult, evaluate
from anatomap.train.pretrain import pretrain


@dataclass
class DemoResult:
    out: Path
    report: Path
    evaluation: EvalResult


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
) -> tuple[Path, Path]:
    """Demo scans, manifest and cache under ``out`` (reused when present).

    ``modalities``: ``("T1w",)`` (the default demo) or T1w plus synthetic contrasts
    (``T2w``, ``FLAIR``); the cache holds exactly these channels.
    Returns the cache folder and the ``subjects.csv`` that marks the held-out subjects.
    """
    data_dir = out / "data"
    log(f"[1/{steps}] demo scans -> {data_dir} ({', '.join(modalities)})")
    info = build_demo(
        data_dir,
        n_subjects=n_subjects,
        n_heldout=n_heldout,
        spacing=spacing,
        progress=progress,
        modalities=modalities,
    )
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
    return out / "cache", data_dir / "subjects.csv"


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
) -> DemoResult:
    """Run the demo end to end into ``out``; returns the report path and the metrics.

    ``config`` names the recipe (``demo``: ISImed, run folder ``runs/isimed``; any other
    name or YAML path trains into ``runs/<its stem>``). ``modalities`` as in
    :func:`prepare_demo`; ``evaluate_options`` go to :func:`evaluate` (e.g. ``compare``).
    """
    out = Path(out)
    cache_dir, subjects_csv = prepare_demo(
        out,
        n_subjects=n_subjects,
        n_heldout=n_heldout,
        spacing=spacing,
        progress=progress,
        log=log,
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
    log(f"[4/5] pretrain {method} -> {run_dir} ({cfg.trainer.max_steps} steps)")
    pretrain(cfg, overwrite=True)

    log(f"[5/5] evaluate -> {run_dir / 'eval'}")
    result = evaluate(run_dir, **(evaluate_options or {}))
    return DemoResult(out, result.report, result)
