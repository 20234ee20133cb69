"""``anatomap evaluate``: run the evaluation tasks on a run or checkpoint and write a report.

Every applicable registered task (:mod:`anatomap.eval.tasks`) runs on the held-out subjects
and compares the checkpoint with a randomly initialised encoder of the same architecture, so
the report shows what pretraining bought. The networks run on ``device`` (auto: a GPU when
there is one; bf16 autocast on CUDA, see :class:`~anatomap.eval.tasks.EvalContext`); a tqdm
bar on stderr follows the tasks (``progress=False``: none).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from anatomap.checkpoint import load_checkpoint, load_objective
from anatomap.data.cache import Cache
from anatomap.errors import AnatomapError
from anatomap.eval.report import Section, write_report
from anatomap.eval.tasks import EvalContext, get_task, list_tasks, progress_bar
from anatomap.infer.device import resolve_device, resolve_precision


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    report: Path
    out_dir: Path


def _loss_figure(run_dir: Path) -> plt.Figure | None:
    from anatomap.checkpoint import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("loss")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    return fig


def evaluate(
    checkpoint: str | Path,
    *,
    out: str | Path | None = None,
    cache: str | Path | None = None,
    subjects: list[str] | None = None,
    tasks: list[str] | None = None,
    all_tasks: bool = False,
    crops_per_subject: int = 48,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    **options: Any,
) -> EvalResult:
    """Evaluate a run folder or checkpoint; writes ``report.html`` and ``metrics.json``.

    ``tasks``: names of registered tasks (default: every default task that applies;
    ``all_tasks``: the costly opt-in ones too, e.g. ``segmentation``). ``device``: auto
    (``None`` too), cpu, cuda, cuda:N or mps, checked before anything is read; ``options``
    may hold ``precision`` (auto, fp32, bf16, fp16) and each task's own options.
    ``progress``: tqdm bars on stderr.
    """
    dev = resolve_device(device or "auto")
    resolve_precision(options.get("precision") or "auto", dev)  # a bad name: one line, now
    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.meta
    # one channel per view in training: evaluate on the first modality
    channels = ckpt.encoder.in_channels if meta["data"].get("modality_per_view") else None
    cache_obj = Cache(cache or meta["data"]["cache"], channels=channels)
    if subjects is None:
        subjects = [s for s in meta["data"].get("heldout_subjects", []) if s in cache_obj]
    if not subjects:
        raise AnatomapError(
            f"{ckpt.path}: no held-out subjects to evaluate on; pass subjects (--subjects) "
            "or train with data.heldout / data.heldout_file"
        )
    ctx = EvalContext(
        ckpt,
        load_objective(ckpt),
        cache_obj,
        subjects,
        seed,
        {"crops_per_subject": crops_per_subject, **options, "device": dev, "progress": progress},
    )
    chosen = [get_task(n) for n in (tasks or list_tasks(default_only=not all_tasks))]
    metrics: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "objective": meta["objective"],
        "step": meta.get("step"),
        "subjects": subjects,
    }
    sections: list[Section] = []
    with progress_bar(chosen, desc="evaluate", enabled=progress, unit="task") as bar:
        for task in bar:
            bar.set_postfix_str(task.name)
            if not task.applies(ctx):
                if tasks is None:
                    continue
                if task.strict:  # e.g. spatial_aware needs its own heads; others may be forced
                    raise AnatomapError(
                        f"{ckpt.path}: task '{task.name}' does not apply to a "
                        f"'{meta['objective']}' checkpoint"
                    )
            result = task.fn(ctx)
            metrics[task.name] = result.metrics
            sections.extend(result.sections)
    loss_fig = _loss_figure(ctx.run_dir)
    if loss_fig is not None:
        sections.append(Section("Training", figures=[("Training loss", loss_fig)]))
    out_dir = Path(out) if out else ctx.run_dir / "eval"
    report = write_report(
        out_dir,
        f"anatomap evaluation: {meta['objective']}",
        sections,
        metrics,
        subtitle=f"checkpoint {ckpt.path} (step {meta.get('step')}), "
        f"code {meta.get('code_version')}, held-out subjects: {', '.join(subjects)}",
    )
    return EvalResult(metrics, report, out_dir)
