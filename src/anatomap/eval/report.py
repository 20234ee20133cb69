"""The evaluation report: ``report.html`` (tables + figures embedded as PNG) and
``metrics.json``. Plots are matplotlib (Agg backend, no display needed)."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0} td,th{padding:.35em .8em;border:1px solid #ddd;
text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.best{font-weight:700;background:#e8f5e9} .note{color:#555;font-size:.92em}
figure{margin:1em 0} figcaption{color:#555;font-size:.9em} img{max-width:100%}
"""


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, list[str], list[list[Any]], dict[str, str]]] = field(
        default_factory=list
    )
    figures: list[tuple[str, Figure]] = field(default_factory=list)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return html.escape(str(v))


def _table(caption: str, header: list[str], rows: list[list[Any]], better: dict[str, str]) -> str:
    """``better`` maps a column name to "max" or "min": the best cell of it is marked."""
    best: dict[int, float] = {}
    for j, name in enumerate(header):
        vals = [r[j] for r in rows if isinstance(r[j], int | float)]
        if name in better and vals:
            best[j] = max(vals) if better[name] == "max" else min(vals)
    out = [f"<table><caption>{html.escape(caption)}</caption><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr>")
    for r in rows:
        cells = []
        for j, v in enumerate(r):
            cls = ' class="best"' if j in best and v == best[j] else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def write_report(
    out_dir: str | Path,
    title: str,
    sections: list[Section],
    metrics: dict[str, Any],
    subtitle: str = "",
) -> Path:
    """Write ``report.html``, ``metrics.json`` and each figure as PNG into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("figure_*.png"):  # a report with fewer figures leaves none behind
        stale.unlink()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(subtitle)}</p>",
    ]
    n = 0
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{sec.text}</p>")
        for caption, header, rows, better in sec.tables:
            parts.append(_table(caption, header, rows, better))
        for caption, fig in sec.figures:
            n += 1
            data = _png(fig)
            (out / f"figure_{n:02d}.png").write_bytes(data)
            b64 = base64.b64encode(data).decode()
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out / "report.html"
