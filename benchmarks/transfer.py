"""Transfer: atlas -> unseen-subject landmark matching, the model against registration.

The template is the MNI152 2009 T1 (2 mm) with its Dosenbach landmarks; the targets are drawn
under four held-out conditions (``anatomap.eval.transfer.CONDITIONS``): synthetic subjects
with contrasts never used in training (T2-, PD-, FLAIR-, CT-like), larger deformations than
training, full and partial field of view; and the real MNI152 T1 under held-out random
warps, full and partial field of view. True landmarks come through each subject's exact map.
Every matcher sees the same pairs and landmarks: the model (``--model``, default the shipped
``brain-mri``), other checkpoints (``--compare NAME=RUN``), SimpleITK rigid+affine and
affine+B-spline, and ANTs SyN when antspyx imports. Seconds per target include the target's
embedding for a model.

    python benchmarks/transfer.py [--model brain-mri] [--targets 5] [--points 50] [--write]

``--write`` replaces the ``transfer`` block of docs/benchmarks.md; ``--out`` keeps every
point's error and score (``points.csv``) for calibration.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command, machine, publish, table

from anatomap.checkpoint import load_model
from anatomap.data.synth import LabelSource
from anatomap.eval.matchers import matcher_for
from anatomap.eval.registration import (
    BSplineRegistration,
    RigidAffineRegistration,
)
from anatomap.eval.registration_ants import SynRegistration, ants_available
from anatomap.eval.transfer import (
    CONDITIONS,
    ConditionResult,
    merge_matcher,
    run_transfer,
    save_matcher,
)

KEYS = ("mre_mm", "median_mm", "cpm@3", "cpm@5", "cpm@10", "s_per_target")


def _matchers(args: argparse.Namespace) -> list:
    out = []
    models = [] if args.baselines_only else [(args.name, args.model)]
    for name, path in [*models, *[c.split("=", 1) for c in args.compare]]:
        encoder, objective, meta = load_model(path)
        out.append(matcher_for(name, encoder, objective, meta))
    if args.models_only:
        return out
    t = args.threads
    out += [RigidAffineRegistration(threads=t), BSplineRegistration(threads=t)]
    if args.no_ants or not ants_available():
        print("ANTs SyN: not run (antspyx does not import here)", flush=True)
    else:
        out.append(SynRegistration(threads=t))
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _rows(res: ConditionResult, names: list[str]) -> list[list[str]]:
    rows = []
    for n in names:
        m = res.metrics(n)
        cells = [f"{m['mre_mm']:.2f}", f"{m['median_mm']:.2f}"]
        cells += [f"{m[k]:.2f}" for k in ("cpm@3", "cpm@5", "cpm@10")]
        fail = f" ({int(m['failed_pairs'])} failed)" if m["failed_pairs"] else ""
        rows.append([n + fail, *cells, f"{m['s_per_target']:.2f}"])
    return rows


def _checks(results: list[ConditionResult], model: str, syn: bool) -> list[str]:
    rows = []
    for r in results:
        me = r.metrics(model)
        rivals = ["rigid+affine"] + (["ANTs SyN"] if syn else [])
        synthetic = r.name.startswith("synthetic")
        for rival in rivals if synthetic else ["rigid+affine"]:
            o = r.metrics(rival)
            if synthetic:
                ok = me["mre_mm"] < o["mre_mm"] and me["cpm@5"] > o["cpm@5"]
                what = f"beats {rival} (MRE and within 5 mm)"
            else:
                ok = me["mre_mm"] <= o["mre_mm"] and me["cpm@5"] >= o["cpm@5"]
                what = f"at least as good as {rival} (MRE and within 5 mm)"
            rows.append(
                [
                    r.name,
                    what,
                    f"{me['mre_mm']:.2f} / {me['cpm@5']:.2f}",
                    f"{o['mre_mm']:.2f} / {o['cpm@5']:.2f}",
                    "yes" if ok else "**no**",
                ]
            )
        s_me, s_ra = me["s_per_target"], r.metrics("rigid+affine")["s_per_target"]
        rows.append(
            [
                r.name,
                "faster per target than rigid+affine",
                f"{s_me:.2f} s",
                f"{s_ra:.2f} s",
                "yes" if s_me < s_ra else "**no**",
            ]
        )
    return table(["condition", "target", f"{model}", "baseline", "met"], rows, "lllll")


def _dump(results: list[ConditionResult], names: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["condition", "target", "contrast", "matcher", "landmark", "error_mm", "score"])
        for r in results:
            for p in r.pairs:
                for n in names:
                    for lmk, e, s in zip(p.names, p.errors(n), p.scores[n], strict=True):
                        w.writerow([r.name, p.target, r.contrasts[p.target], n, lmk, e, s])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="brain-mri", help="checkpoint, run or shipped name")
    ap.add_argument("--name", default="brain-mri", help="its row name")
    ap.add_argument("--compare", nargs="*", default=[], help="NAME=RUN other checkpoints")
    ap.add_argument("--targets", type=int, default=5, help="targets per condition")
    ap.add_argument("--points", type=int, default=50, help="landmarks per target")
    ap.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    ap.add_argument("--no-ants", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch / ITK threads of every matcher")
    ap.add_argument("--out", type=Path, default=None, help="folder for points.csv")
    ap.add_argument(
        "--saved",
        type=Path,
        default=None,
        help="folder: each matcher run is saved there, and matchers saved there by an "
        "earlier run on the same pairs are added to the table",
    )
    ap.add_argument("--baselines-only", action="store_true", help="registration rows only")
    ap.add_argument("--models-only", action="store_true", help="model rows only")
    ap.add_argument("--table-only", action="store_true", help="run nothing: the --saved rows")
    ap.add_argument("--only", nargs="*", default=[], help="run only these matcher rows")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    matchers = [] if args.table_only else _matchers(args)
    if args.only:
        matchers = [m for m in matchers if m.name in args.only]
    names = [m.name for m in matchers]
    t0 = time.perf_counter()
    results = run_transfer(
        matchers,
        LabelSource.brain("dosenbach"),
        args.conditions,
        args.targets,
        args.points,
        log=lambda s: print(s, flush=True),
    )
    minutes = (time.perf_counter() - t0) / 60
    notes = {n: f"`{command()}` ({minutes:.1f} min)" for n in names}
    if args.saved:
        for n in names:
            save_matcher(results, n, args.saved / f"{_slug(n)}.json", notes[n])
        for f in sorted(args.saved.glob("*.json")):
            if f.stem not in {_slug(n) for n in names}:
                name, note = merge_matcher(results, f)
                names.append(name)
                notes[name] = note
    order = ["rigid+affine", "affine+bspline", "ANTs SyN"]
    names.sort(key=lambda n: order.index(n) if n in order else -1)
    if args.out:
        _dump(results, names, args.out / "points.csv")

    lines = [
        "### Transfer: MNI152 atlas -> unseen subjects, model vs registration",
        "",
        f"Template: the MNI152 2009 T1 at 2 mm with its Dosenbach landmarks; {args.targets} "
        f"targets per condition, up to {args.points} landmarks each (those in the target's "
        "field of view), true positions through each subject's exact map. Seconds per target "
        "include the target's embedding for the model. Evaluation seeds are never used in "
        f"training. Machine: {machine()}, {args.threads} thread(s) per matcher, shared with "
        "other jobs (load average 6-12, so seconds are inflated and noisy).",
        "",
        "Commands (rows saved with `--saved` and merged; pairs and landmarks are identical, "
        "checked):",
        "",
        *[f"- {n}: {notes[n]}" for n in names],
        "",
    ]
    for r in results:
        contrast_list = ", ".join(sorted(set(r.contrasts.values())))
        lines += [f"**{r.name}** (targets: {contrast_list})", ""]
        lines += table(
            ["matcher", "MRE (mm)", "median", "<=3 mm", "<=5 mm", "<=10 mm", "s/target"],
            _rows(r, names),
        )
        lines.append("")
    if args.name in names and "rigid+affine" in names:
        lines += ["Issue 14's targets:", ""]
        lines += _checks(results, args.name, "ANTs SyN" in names)
    publish("transfer", lines, args.write)


if __name__ == "__main__":
    main()
