"""SAM landmark matching against registration, ISImed and the untrained encoder.

Builds (or reuses) the demo, trains SAM with the default CPU recipe (``configs/sam.yaml``)
and ISImed with the demo recipe unless runs are given, then evaluates landmark matching on
the held-out pairs and prints: MRE, median, CPM@3/5/10 mm (all pairs and partial-FOV
targets) and time per target, plus the issue's targets (SAM vs affine on MRE; SAM vs
affine + B-spline on partial targets; speed ratios). ``--write`` puts the table into
docs/benchmarks.md between ``<!-- sam_matching:start -->`` and ``<!-- sam_matching:end -->``.

    python benchmarks/sam_matching.py --out /tmp/sam_bench [--sam RUN] [--isimed RUN] [--write]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from anatomap.api import load_config
from anatomap.eval.evaluate import evaluate
from anatomap.train.pretrain import pretrain
from anatomap.workflows.demo import run_demo

START, END = "<!-- sam_matching:start -->", "<!-- sam_matching:end -->"


def _train(name: str, out: Path, overrides: list[str]) -> tuple[Path, float]:
    t0 = time.perf_counter()
    cfg = load_config(name, [*overrides, f"output={out}", "trainer.progress=false"])
    pretrain(cfg, overwrite=True)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("/tmp/sam_bench"))
    ap.add_argument("--sam", type=Path, help="an existing SAM run (skip training)")
    ap.add_argument("--isimed", type=Path, help="an existing ISImed run (skip training)")
    ap.add_argument("--sam-steps", type=int, default=None, help="override trainer.max_steps")
    ap.add_argument("--max-points", type=int, default=40, help="landmarks per pair")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    demo = run_demo(
        args.out / "demo", progress=False, overrides=["trainer.max_steps=1"], log=lambda *_: None
    )
    cache = demo.out / "cache"
    split = demo.out / "data" / "subjects.csv"
    data = [f"data.cache={cache}", f"data.heldout_file={split}"]
    times = {}
    sam = args.sam
    if sam is None:
        extra = [f"trainer.max_steps={args.sam_steps}"] if args.sam_steps else []
        sam, times["sam"] = _train("sam", args.out / "sam", [*data, *extra])
    isimed = args.isimed
    if isimed is None:
        isimed, times["isimed"] = _train("demo", args.out / "isimed", data)

    res = evaluate(
        sam,
        tasks=["landmarks"],
        compare={"isimed (crop matching)": str(isimed)},
        max_points=args.max_points,
        subjects_csv=str(split),  # its `partial` column marks partial-FOV subjects
        out=args.out / "eval",
    )
    lm = res.metrics["landmarks"]
    rows = lm["matchers"]
    sam_name = next(n for n in rows if n.endswith("(pretrained)"))

    def cell(m: dict, key: str) -> str:
        v = m[key]
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [
        "### SAM landmark matching vs registration (demo, held-out pairs)",
        "",
        f"{lm['n_pairs']} ordered pairs of held-out demo subjects ({lm['n_partial_pairs']} with a "
        f"partial-FOV target), up to {args.max_points} landmarks per pair; machine: "
        f"{platform.machine()}, 2 CPU cores. "
        + (
            "Training times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
            if times
            else f"Runs given: SAM {sam}, ISImed {isimed}"
        )
        + ".",
        f"Command: `python benchmarks/sam_matching.py --out {args.out}`",
        "",
        "| matcher | MRE (mm) | median | CPM@3 | CPM@5 | CPM@10 | partial MRE | partial CPM@5 "
        "| s/target (prepare + match) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows.items():
        o, p, t = m["overall"], m.get("partial_targets") or {}, m["timing"]
        lines.append(
            f"| {name} | {cell(o, 'mre_mm')} | {cell(o, 'median_mm')} | {cell(o, 'cpm@3')} | "
            f"{cell(o, 'cpm@5')} | {cell(o, 'cpm@10')} | "
            f"{cell(p, 'mre_mm') if p else '-'} | {cell(p, 'cpm@5') if p else '-'} | "
            f"{t['time_per_target_s']:.2f} ({t['prepare_s']:.2f} + {t['match_s']:.3f}) |"
        )
    s, a, b = rows[sam_name], rows["affine"], rows["affine+bspline"]
    sp = s["partial_targets"] or {}
    bp = b["partial_targets"] or {}
    checks = [
        ("SAM MRE < affine MRE", s["overall"]["mre_mm"], a["overall"]["mre_mm"]),
        ("SAM partial MRE < affine+bspline partial MRE", sp.get("mre_mm"), bp.get("mre_mm")),
    ]
    lines += ["", "| target | SAM | baseline | met |", "|---|---:|---:|:-:|"]
    for label, x, y in checks:
        met = x is not None and y is not None and x < y
        lines.append(
            f"| {label} | {x:.2f} | {y:.2f} | {'yes' if met else 'no'} |"
            if x is not None and y is not None
            else f"| {label} | - | - | - |"
        )
    match_ratio = b["timing"]["match_s"] / max(s["timing"]["match_s"], 1e-9)
    total_ratio = b["timing"]["time_per_target_s"] / max(s["timing"]["time_per_target_s"], 1e-9)
    lines += [
        f"| matching >= 20x faster than affine+bspline (embeddings exist) | "
        f"{s['timing']['match_s']:.3f} s | {b['timing']['match_s']:.2f} s | "
        f"{'yes' if match_ratio >= 20 else 'no'} ({match_ratio:.0f}x) |",
        f"| >= 5x faster including embedding | {s['timing']['time_per_target_s']:.2f} s | "
        f"{b['timing']['time_per_target_s']:.2f} s | "
        f"{'yes' if total_ratio >= 5 else 'no'} ({total_ratio:.1f}x) |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(f"report: {res.report}")
    if args.write:
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        old = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
        block = f"{START}\n{text}\n{END}"
        if START in old and END in old:
            new = old[: old.index(START)] + block + old[old.index(END) + len(END) :]
        else:
            new = old.rstrip("\n") + "\n\n" + block + "\n"
        doc.write_text(new)


if __name__ == "__main__":
    main()
