"""Tables of ``anatomap benchmark``: one row per method, one column per metric.

The metric columns are declared here once (:data:`COLUMNS`): which task, which entry of its
metrics, and whether higher or lower is better. A method's row reads its pretrained entry;
the ``random init`` row reads the random-init entry of the first method evaluated, and the
registration baselines (landmark task only) read their own entries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from anatomap.eval.report import Section, write_page
from anatomap.io.atomic import atomic_write_json

RANDOM = "random init"


def _worst_drop(entry: Any) -> float | None:
    """The largest position-error increase (mm) over the single-modality drops."""
    if not isinstance(entry, dict):
        return None
    vals = [d.get("mean_error_mm") for d in entry.values() if isinstance(d, dict)]
    vals = [v for v in vals if isinstance(v, int | float)]
    return max(vals) if vals else None


@dataclass(frozen=True)
class Column:
    label: str
    task: str
    path: str  # dotted path inside the task's entry for one encoder ("" = the entry itself)
    better: str  # "max" or "min"
    group: str = "encoders"  # dotted key of the task's metrics holding one entry per encoder
    random_key: str = RANDOM  # the entry of the untrained baseline
    reduce: Callable[[Any], float | None] | None = None  # entry -> value, instead of path


COLUMNS: tuple[Column, ...] = (
    Column("position Spearman", "position", "spearman", "max"),
    Column("position R2", "position", "r2", "max"),
    Column("position error mm", "position", "mean_error_mm", "min"),
    Column("landmark MRE mm", "landmarks", "overall.mre_mm", "min", "matchers"),
    Column("landmark CPM@5", "landmarks", "overall.cpm@5", "max", "matchers"),
    Column("region probe acc", "region", "linear_accuracy", "max"),
    Column("region kNN F1", "region", "knn_macro_f1", "max"),
    Column(
        "tissue Dice 1 subj", "segmentation", "1", "max", "label_sets.tissue.mean_dice", "scratch"
    ),
    Column(
        "tissue Dice 3 subj", "segmentation", "3", "max", "label_sets.tissue.mean_dice", "scratch"
    ),
    Column("RankMe", "health", "rankme", "max"),
    Column("MONAI collapse", "health", "monai_aggregate", "min"),
    Column("worst modality drop mm", "robustness", "", "min", "drop", reduce=_worst_drop),
)


def _dig(obj: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _entries(metrics: dict[str, Any], col: Column) -> dict[str, Any]:
    entries = _dig(metrics.get(col.task), col.group)
    return entries if isinstance(entries, dict) else {}


def _value(entry: Any, col: Column) -> float | None:
    if entry is None:
        return None
    return _number(col.reduce(entry) if col.reduce else _dig(entry, col.path))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(float(v)) else None


def build_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (methods, random init, registration baselines) of the summary."""
    header = ["method", "encoder", *[c.label for c in COLUMNS], "train s", "trainer peak RSS MB"]
    rows: list[list[Any]] = []
    random_row: list[Any] | None = None
    extra: dict[str, list[Any]] = {}
    for method, entry in results.items():
        metrics = entry.get("metrics") or {}
        train = entry.get("train") or {}
        row: list[Any] = [method, entry.get("encoder", "")]
        for col in COLUMNS:
            ents = _entries(metrics, col)
            pre = next((v for k, v in ents.items() if k.endswith("(pretrained)")), None)
            row.append(_value(pre, col))
        if entry.get("error"):
            row = [f"{method} (failed)", entry.get("encoder", "")] + [None] * len(COLUMNS)
        peak = train.get("peak_rss_mb")
        row += [_number(train.get("wall_s")), _number(peak) if peak else None]
        rows.append(row)
        if random_row is None and metrics:
            random_row = [RANDOM, entry.get("encoder", "")]
            for col in COLUMNS:
                random_row.append(_value(_entries(metrics, col).get(col.random_key), col))
            random_row += [None, None]
        for col_i, col in enumerate(COLUMNS):
            for name, ent in _entries(metrics, col).items():
                if col.task != "landmarks" or name == RANDOM or "(" in name:
                    continue  # registration baselines only (not --compare runs)
                r = extra.setdefault(name, [name, "registration"] + [None] * (len(COLUMNS) + 2))
                r[2 + col_i] = _value(ent, col)
    if random_row is not None:
        rows.append(random_row)
    rows.extend(extra.values())
    return header, rows


def _best(header: list[str], rows: list[list[Any]]) -> dict[int, float]:
    better = {c.label: c.better for c in COLUMNS}
    best: dict[int, float] = {}
    for j, name in enumerate(header):
        vals = [r[j] for r in rows if isinstance(r[j], float)]
        if name in better and vals:
            best[j] = max(vals) if better[name] == "max" else min(vals)
    return best


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """GitHub Markdown; the best value of each metric column in bold."""
    best = _best(header, rows)

    def cell(j: int, v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            text = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
            return f"**{text}**" if best.get(j) == v else text
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(j, v) for j, v in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


def _bar_figures(header: list[str], rows: list[list[Any]]) -> list[tuple[str, Any]]:
    figs = []
    for j, col in enumerate(COLUMNS, 2):  # after method and encoder
        pts = [(r[0], r[j]) for r in rows if isinstance(r[j], float)]
        if len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 0.45 * len(pts) + 1.0))
        names, vals = zip(*pts, strict=True)
        best = max(vals) if col.better == "max" else min(vals)
        ax.barh(names, vals, color=["#2e7d32" if v == best else "#90a4ae" for v in vals])
        ax.invert_yaxis()
        ax.set_xlabel(f"{col.label} ({'higher' if col.better == 'max' else 'lower'} is better)")
        fig.tight_layout()
        figs.append((col.label, fig))
    return figs


def write_benchmark_report(out_dir: Path, cfg: Any, results: dict[str, dict[str, Any]]) -> Path:
    """Write ``benchmark.json``, ``benchmark.md`` and ``benchmark.html`` into ``out_dir``."""
    header, rows = build_table(results)
    md = markdown_table(header, rows)
    (out_dir / "benchmark.md").write_text(md + "\n", encoding="utf-8")
    atomic_write_json(
        out_dir / "benchmark.json",
        json.loads(
            json.dumps(
                {
                    "config": cfg.model_dump(mode="json"),
                    "header": header,
                    "rows": rows,
                    "methods": results,
                },
                default=str,
            )
        ),
    )
    better = {c.label: c.better for c in COLUMNS}
    links = "".join(
        f'<li><a href="runs/{m}/eval/report.html">{m}</a>'
        + (f" (failed: {e['error']})" if e.get("error") else "")
        + "</li>"
        for m, e in results.items()
    )
    sections = [
        Section(
            "Benchmark",
            text="Same data, encoder and step budget for every method; the random-init row "
            "is the untrained encoder, the registration rows are SimpleITK baselines of the "
            f"landmark task. Per-method reports: <ul>{links}</ul>",
            tables=[("Benchmark", header, rows, better)],
        ),
        Section("Metrics", figures=_bar_figures(header, rows)),
    ]
    return write_page(
        out_dir / "benchmark.html",
        "anatomap benchmark",
        sections,
        summary=[],  # the benchmark table is the summary
        subtitle=f"methods: {', '.join(results)}; budget: {cfg.trainer}",
    )
