"""The ``landmarks`` evaluation task: landmark matching on held-out pairs.

It compares the checkpoint with its random-init twin, the registration baselines
(:mod:`anatomap.eval.registration`) and, when given, other checkpoints (``compare``); the
matchers come from :func:`anatomap.eval.matchers.build_matchers`, the metrics from
:func:`anatomap.eval.landmarks.evaluate_matchers`.
"""

from __future__ import annotations

from pathlib import Path

from anatomap.eval import landmarks as lm
from anatomap.eval.landmark_figures import landmark_sections
from anatomap.eval.matchers import build_matchers
from anatomap.eval.tasks import EvalContext, TaskResult, register_task
from anatomap.objectives.base import DenseObjective


def _applies(ctx: EvalContext) -> bool:
    """By default for dense checkpoints (matching is what they are for) with landmarks on at
    least two held-out subjects; ask for it by name (``tasks=["landmarks"]``) otherwise."""
    dense = isinstance(ctx.objective, DenseObjective)
    return dense and sum(bool(ctx.cache[s].landmarks) for s in ctx.subjects) >= 2


@register_task("landmarks", applies=_applies)
def landmark_task(ctx: EvalContext) -> TaskResult:
    """Landmark matching on held-out pairs: MRE, median, CPM@3/5/10 mm, time per target."""
    partial = set(ctx.options.get("partial") or ())
    csv_path = ctx.options.get("subjects_csv") or ctx.meta.get("data", {}).get("heldout_file")
    if not partial and csv_path and Path(csv_path).is_file():
        partial = lm.partial_subjects(Path(csv_path))
    report = lm.evaluate_matchers(
        build_matchers(ctx),
        ctx.cache,
        ctx.subjects,
        partial=partial,
        max_points=ctx.options.get("max_points", 40),
        seed=ctx.seed,
        progress=ctx.progress,
    )
    return TaskResult(report.metrics(), landmark_sections(report))
