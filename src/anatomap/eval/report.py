"""The evaluation report: one standalone HTML page (tables, figures embedded as PNG data URIs,
inline CSS and JavaScript only: it opens from disk, with no server and no internet) plus
``metrics.json``. Plots are matplotlib (Agg backend, no display needed).

Layout: title, a contents list, the **summary table** (every task's headline metrics, one
column per method, the best of each row marked), then one section per task (text, tables,
interactive blocks, figures). :func:`write_page` writes such a page for any caller (the
benchmark uses it); :func:`write_report` adds ``metrics.json`` and ``figure_NN.png``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from anatomap.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0} td,th{padding:.35em .8em;border:1px solid #ddd;
text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
caption{text-align:left;font-weight:600;padding:.3em 0}
.best{font-weight:700;background:#e8f5e9} .note{color:#555;font-size:.92em}
tr.task th{background:#e3ecf7;text-align:left} tr.task th.m{text-align:right;font-weight:600}
.dir{color:#777;font-size:.85em}
figure{margin:1em 0} figcaption{color:#555;font-size:.9em} img{max-width:100%}
nav ul{columns:2;font-size:.95em}
.am-sim .am-base{display:none} .am-row{display:flex;flex-wrap:wrap;gap:1em}
.am-panel{text-align:center} .am-name{font-size:.9em;color:#333}
.am-canvas{cursor:crosshair;border:1px solid #ccc;image-rendering:pixelated;max-width:100%}
"""

# Inline script of the clicked-point similarity widget (eval/figures.py:similarity_widget):
# each .am-sim block holds the slice (img.am-base), int8 features per model (JSON) and one
# canvas per model; a click computes every model's cosine similarity to that position.
WIDGET_JS = r"""
(function(){
"use strict";
function decode(b64){var s=atob(b64),a=new Int8Array(s.length);
  for(var i=0;i<s.length;i++){a[i]=(s.charCodeAt(i)<<24)>>24;}return a;}
function init(root){
  var P=JSON.parse(root.querySelector(".am-data").textContent);
  var img=root.querySelector("img.am-base");
  var status=root.querySelector(".am-status");
  var canvases=Array.prototype.slice.call(root.querySelectorAll("canvas.am-canvas"));
  var models=P.models.map(function(m){
    var q=decode(m.data),n=m.h*m.w,norm=new Float32Array(n);
    for(var p=0;p<n;p++){var s=0;for(var k=0;k<m.d;k++){var v=q[p*m.d+k];s+=v*v;}
      norm[p]=Math.sqrt(s)||1;}
    return {name:m.name,d:m.d,h:m.h,w:m.w,stride:m.stride,q:q,norm:norm};});
  function draw(i,j){
    var S=P.scale;
    canvases.forEach(function(cv){
      var m=models[+cv.getAttribute("data-model")],ctx=cv.getContext("2d");
      ctx.globalAlpha=1;ctx.imageSmoothingEnabled=false;
      ctx.drawImage(img,0,0,P.nx*S,P.ny*S);
      var a=Math.min(m.h-1,Math.max(0,Math.round(i/m.stride)));
      var b=Math.min(m.w-1,Math.max(0,Math.round(j/m.stride)));
      var p0=a*m.w+b,off=document.createElement("canvas");
      off.width=m.h;off.height=m.w;
      var octx=off.getContext("2d"),im=octx.createImageData(m.h,m.w);
      for(var aa=0;aa<m.h;aa++){for(var bb=0;bb<m.w;bb++){
        var p=aa*m.w+bb,s=0;
        for(var k=0;k<m.d;k++){s+=m.q[p0*m.d+k]*m.q[p*m.d+k];}
        var c=s/(m.norm[p0]*m.norm[p]);
        var li=Math.max(0,Math.min(255,Math.round((c+1)*127.5)));
        var o=((m.w-1-bb)*m.h+aa)*4;
        im.data[o]=P.lut[li][0];im.data[o+1]=P.lut[li][1];im.data[o+2]=P.lut[li][2];
        im.data[o+3]=255;}}
      octx.putImageData(im,0,0);
      var st=m.stride;
      ctx.imageSmoothingEnabled=true;ctx.globalAlpha=0.65;
      ctx.drawImage(off,(0.5-st/2)*S,(P.ny-0.5-st*(m.w-1)-st/2)*S,m.h*st*S,m.w*st*S);
      ctx.globalAlpha=1;ctx.strokeStyle="#00e5ff";ctx.lineWidth=2;
      var x=(i+0.5)*S,y=(P.ny-1-j+0.5)*S;
      ctx.beginPath();ctx.moveTo(x-7,y);ctx.lineTo(x+7,y);ctx.moveTo(x,y-7);ctx.lineTo(x,y+7);
      ctx.stroke();});
    if(status){status.textContent="Similarity to image voxel ("+i+", "+j+
      ") of this slice; click another point.";}
  }
  canvases.forEach(function(cv){cv.addEventListener("click",function(ev){
    var r=cv.getBoundingClientRect();
    var x=(ev.clientX-r.left)*cv.width/r.width,y=(ev.clientY-r.top)*cv.height/r.height;
    var i=Math.min(P.nx-1,Math.max(0,Math.floor(x/P.scale)));
    var j=Math.min(P.ny-1,Math.max(0,P.ny-1-Math.floor(y/P.scale)));
    draw(i,j);});});
  function start(){draw(P.start[0],P.start[1]);}
  if(img.complete&&img.naturalWidth){start();}else{img.addEventListener("load",start);}
}
Array.prototype.forEach.call(document.querySelectorAll(".am-sim"),init);
})();
"""

Table = tuple[str, list[str], list[list[Any]], dict[str, str]]
"""(caption, header, rows, better): ``better`` maps a column name to "max" or "min"."""


@dataclass
class SummaryBlock:
    """One task's rows of the summary table: ``methods`` are the columns, each row is
    ``(metric, one value per method, "max" | "min" | None)``."""

    task: str
    methods: list[str]
    rows: list[tuple[str, list[Any], str | None]]


@dataclass
class Section:
    """A part of the page. ``summary``: the task's rows of the summary table (default: taken
    from its first table, see :func:`summary_from_table`); ``html``: raw blocks (e.g. the
    interactive similarity widget) placed before the figures."""

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Figure]] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    summary: SummaryBlock | None = None


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return html.escape(str(v))


def _best(values: Sequence[Any], better: str | None) -> float | None:
    nums = [v for v in values if _is_number(v)]
    if better not in ("max", "min") or len(nums) < 2:
        return None
    return max(nums) if better == "max" else min(nums)


def _table(caption: str, header: list[str], rows: list[list[Any]], better: dict[str, str]) -> str:
    """``better`` maps a column name to "max" or "min": the best cell of it is marked."""
    best = {j: _best([r[j] for r in rows], better.get(name)) for j, name in enumerate(header)}
    out = [f"<table><caption>{html.escape(caption)}</caption><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr>")
    for r in rows:
        cells = []
        for j, v in enumerate(r):
            cls = ' class="best"' if best.get(j) is not None and v == best[j] else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def summary_from_table(task: str, table: Table) -> SummaryBlock:
    """A task's summary rows from a table whose rows are methods (first column) and whose
    scored columns (those in ``better``) are metrics: the table transposed."""
    _, header, rows, better = table
    methods = [str(r[0]) for r in rows]
    out = [
        (name, [r[j] for r in rows], better[name])
        for j, name in enumerate(header)
        if j > 0 and name in better
    ]
    return SummaryBlock(task, methods, out)


def section_summaries(sections: Sequence[Section]) -> list[SummaryBlock]:
    """Each section's summary block (explicit, else from its first table)."""
    blocks = []
    for sec in sections:
        if sec.summary is not None:
            blocks.append(sec.summary)
        elif sec.tables:
            block = summary_from_table(sec.title, sec.tables[0])
            if block.rows:
                blocks.append(block)
    return blocks


def summary_table(blocks: Sequence[SummaryBlock]) -> str:
    """One table: per task a header row naming its methods, then one row per metric with
    the best value marked (bold, green) and the direction (higher / lower is better)."""
    if not blocks:
        return ""
    out = ["<table class='summary'><caption>Summary (best of each row in bold)</caption>"]
    for b in blocks:
        out.append(
            f"<tr class='task'><th>{html.escape(b.task)}</th>"
            + "".join(f"<th class='m'>{html.escape(m)}</th>" for m in b.methods)
            + "</tr>"
        )
        for metric, values, better in b.rows:
            best = _best(values, better)
            arrow = {"max": " (higher is better)", "min": " (lower is better)"}.get(better or "")
            cells = [f"<td>{html.escape(metric)}<span class='dir'>{arrow}</span></td>"]
            for v in values:
                cls = " class='best'" if best is not None and v == best else ""
                cells.append(f"<td{cls}>{_fmt(v)}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _anchor(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    a, k = base, 2
    while a in used:
        a, k = f"{base}-{k}", k + 1
    used.add(a)
    return a


def render_page(
    title: str,
    sections: Sequence[Section],
    *,
    summary: Sequence[SummaryBlock] | None = None,
    subtitle: str = "",
    figure_sink: list[bytes] | None = None,
) -> str:
    """The page as one HTML string (see :func:`write_page`). PNG bytes of every figure, in
    page order, are appended to ``figure_sink`` when given."""
    blocks = section_summaries(sections) if summary is None else list(summary)
    used: set[str] = set()
    anchors = [_anchor(s.title, used) for s in sections]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p class='note'>{html.escape(subtitle)}</p>")
    if sections:
        items = "".join(
            f"<li><a href='#{a}'>{html.escape(s.title)}</a></li>"
            for a, s in zip(anchors, sections, strict=True)
        )
        parts.append(f"<nav><ul>{items}</ul></nav>")
    parts.append(summary_table(blocks))
    has_widget = False
    for anchor, sec in zip(anchors, sections, strict=True):
        parts.append(f"<h2 id='{anchor}'>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{sec.text}</p>")
        for caption, header, rows, better in sec.tables:
            parts.append(_table(caption, header, rows, better))
        for block in sec.html:
            has_widget = has_widget or "am-sim" in block
            parts.append(block)
        for caption, fig in sec.figures:
            data = _png(fig)
            if figure_sink is not None:
                figure_sink.append(data)
            b64 = base64.b64encode(data).decode()
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    if has_widget:
        parts.append(f"<script>{WIDGET_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(
    path: str | Path,
    title: str,
    sections: Sequence[Section],
    *,
    summary: Sequence[SummaryBlock] | None = None,
    subtitle: str = "",
) -> Path:
    """Write one standalone HTML page: title, contents, summary table, then the sections.

    ``summary``: the summary table's blocks; ``None`` takes them from the sections
    (:func:`section_summaries`), ``[]`` leaves the table out. Everything is inline (figures
    as PNG data URIs), so the file can be mailed or opened from disk. Written atomically.
    """
    text = render_page(title, sections, summary=summary, subtitle=subtitle)
    return atomic_write_text(path, text, what="report")


def write_report(
    out_dir: str | Path,
    title: str,
    sections: list[Section],
    metrics: dict[str, Any],
    subtitle: str = "",
    summary: Sequence[SummaryBlock] | None = None,
) -> Path:
    """Write ``report.html`` (:func:`render_page`), ``metrics.json`` and each figure as
    ``figure_NN.png`` into ``out_dir``, each file atomically (non-finite metrics as null)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("figure_*.png"):  # a report with fewer figures leaves none behind
        stale.unlink()
    pngs: list[bytes] = []
    text = render_page(title, sections, summary=summary, subtitle=subtitle, figure_sink=pngs)
    for n, data in enumerate(pngs, start=1):
        atomic_write_bytes(out / f"figure_{n:02d}.png", data, what="figure")
    atomic_write_text(out / "report.html", text, what="report")
    atomic_write_json(out / "metrics.json", metrics, what="metrics")
    return out / "report.html"
