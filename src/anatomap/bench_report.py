"""Tables of ``anatomap benchmark``: one row per method, one column per metric.

The metric columns are declared here once (:data:`COLUMNS`): which task, which entry of its
metrics, and whether higher or lower is better. A method's row reads its pretrained entry;
the ``random init`` row reads the random-init entry of the first method evaluated, and the
registration baselines (landmark task only) read their own entries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from anatomap.data.cache import atomic_write_json
from anatomap.eval.report import Section, write_report

RANDOM = "random init"


@dataclass(frozen=True)
class Column:
    label: str
    task: str
    path: str  # dotted path inside the task's entry for one encoder
    better: str  # "max" or "min"
    group: str = "encoders"  # key of the task's metrics holding the entries


COLUMNS: tuple[Column, ...] = (
    Column("position Spearman", "position", "spearman", "max"),
    Column("position R2", "position", "r2", "max"),
    Column("position error mm", "position", "mean_error_mm", "min"),
    Column("landmark MRE mm", "landmarks", "overall.mre_mm", "min", "matchers"),
    Column("landmark CPM@5", "landmarks", "overall.cpm@5", "max", "matchers"),
)


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _entries(metrics: dict[str, Any], col: Column) -> dict[str, Any]:
    group = _dig(metrics, f"{col.task}")
    if not isinstance(group, dict):
        return {}
    entries = group.get(col.group)
    return entries if isinstance(entries, dict) else {}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(float(v)) else None


def build_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (methods, random init, registration baselines) of the summary."""
    header = ["method", *[c.label for c in COLUMNS], "train s", "peak RSS MB"]
    rows: list[list[Any]] = []
    random_row: list[Any] | None = None
    extra: dict[str, list[Any]] = {}
    for method, entry in results.items():
        metrics = entry.get("metrics") or {}
        train = entry.get("train") or {}
        row: list[Any] = [method]
        for col in COLUMNS:
            ents = _entries(metrics, col)
            pre = next((v for k, v in ents.items() if k.endswith("(pretrained)")), None)
            row.append(_number(_dig(pre, col.path)) if pre else None)
        if entry.get("error"):
            row = [f"{method} (failed)"] + [None] * len(COLUMNS)
        peak = max(train.get("peak_rss_mb", 0.0), train.get("workers_peak_rss_mb", 0.0))
        row += [_number(train.get("wall_s")), _number(peak) if peak else None]
        rows.append(row)
        if random_row is None and metrics:
            random_row = [RANDOM]
            for col in COLUMNS:
                random_row.append(_number(_dig(_entries(metrics, col).get(RANDOM), col.path)))
            random_row += [None, None]
        for col_i, col in enumerate(COLUMNS):
            for name, ent in _entries(metrics, col).items():
                if name == RANDOM or name.endswith("(pretrained)") or "(" in name:
                    continue  # registration baselines only (not --compare runs)
                r = extra.setdefault(name, [name] + [None] * (len(COLUMNS) + 2))
                r[1 + col_i] = _number(_dig(ent, col.path))
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
            text = f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
            return f"**{text}**" if best.get(j) == v else text
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(j, v) for j, v in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


def _bar_figures(header: list[str], rows: list[list[Any]]) -> list[tuple[str, Any]]:
    figs = []
    for j, col in enumerate(COLUMNS, 1):
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
    (out_dir / "benchmark.md").write_text(md + "\n")
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
            "Summary",
            text="Same data, encoder and step budget for every method; the random-init row "
            "is the untrained encoder, the registration rows are SimpleITK baselines of the "
            f"landmark task. Per-method reports: <ul>{links}</ul>",
            tables=[("Benchmark", header, rows, better)],
        ),
        Section("Metrics", figures=_bar_figures(header, rows)),
    ]
    page = write_report(
        out_dir / "html",
        "anatomap benchmark",
        sections,
        {"header": header, "rows": rows},
        subtitle=f"methods: {', '.join(results)}; budget: {cfg.trainer}",
    )
    target = out_dir / "benchmark.html"
    target.write_text(page.read_text().replace('href="runs/', 'href="runs/'))
    return target
