"""Calibrated match score of a dense model, and shipping it as a packaged model.

Fits ``P(error <= 5 mm | score)`` (isotonic) on MNI152 -> synthetic-subject matches drawn
with a calibration seed (``SEED + 1``: neither training's nor the transfer benchmark's
subjects), then checks it on the transfer benchmark's own points (``points.csv`` from
``benchmarks/transfer.py --out``): reliability table and plot, and the error of matches
flagged low-confidence (probability < 0.5) against the others. ``--ship NAME`` writes the
model into ``src/anatomap/zoo/NAME`` (float16) with the calibration in its meta.json.

    python benchmarks/calibration.py --model RUN --points runs/transfer/points.csv
        [--targets 3] [--ship brain-mri --summary "..."] [--write]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command, publish, table

from anatomap.checkpoint import load_model
from anatomap.data.synth import LabelSource
from anatomap.eval.matchers import matcher_for
from anatomap.eval.transfer import (
    CONDITIONS,
    SEED,
    condition_targets,
    run_condition,
    template_subject,
)
from anatomap.infer.calibration import fit_calibration, probability, reliability, reliability_plot
from anatomap.infer.zoo import ship_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _fit_points(model: str, targets: int) -> tuple[np.ndarray, np.ndarray]:
    encoder, objective, meta = load_model(model)
    m = matcher_for("model", encoder, objective, meta)
    source = LabelSource.brain("dosenbach")
    tpl = template_subject(source)
    state = {"model": m.prepare(tpl)}
    scores, errors = [], []
    for cond in CONDITIONS:
        tg, contrasts = condition_targets(source, cond, targets, seed=SEED + 1)
        res = run_condition([m], tpl, state, cond, tg, contrasts, max_points=None)
        scores.append(res.scores("model"))
        errors.append(res.errors("model"))
    return np.concatenate(scores), np.concatenate(errors)


def _bench_points(path: Path, matcher: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["matcher"] == matcher]
    s = np.array([float(r["score"]) for r in rows])
    e = np.array([float(r["error_mm"]) for r in rows])
    return s, e, [r["condition"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--points", type=Path, required=True, help="transfer benchmark points.csv")
    ap.add_argument("--matcher", default="brain-mri", help="its row name in points.csv")
    ap.add_argument("--targets", type=int, default=3, help="calibration targets per condition")
    ap.add_argument("--ship", default=None, help="write src/anatomap/zoo/NAME")
    ap.add_argument("--summary", default="")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)

    fit_s, fit_e = _fit_points(args.model, args.targets)
    cal = fit_calibration(
        fit_s, fit_e, 5.0, note=f"MNI152 -> {len(fit_s)} matches, seed {SEED + 1}"
    )
    s, e, conds = _bench_points(args.points, args.matcher)
    p = probability(cal, s)
    hit = e <= 5.0
    plot = reliability_plot(
        p,
        hit,
        ROOT / "docs" / "figures" / "brain_mri_reliability.png",
        title="brain-mri on the transfer benchmark (held-out)",
    )
    flagged = p < 0.5
    lines = [
        "### Calibrated score (P(error <= 5 mm)) of brain-mri",
        "",
        f"Fitted (isotonic) on {cal['n']} matches of {args.targets} targets per transfer "
        f"condition drawn with seed {SEED + 1}; checked on the {len(s)} matches of the "
        "transfer benchmark above. Reliability plot: "
        f"[docs/figures/{plot.name}](figures/{plot.name}).",
        f"Command: `{command()}`",
        "",
    ]
    lines += table(
        ["predicted (bin mean)", "observed within 5 mm", "matches"],
        [[f"{r['predicted']:.2f}", f"{r['observed']:.2f}", r["n"]] for r in reliability(p, hit)],
    )
    rows = []
    for name, m in [
        ("all", np.ones(len(e), bool)),
        *[(c, np.array([x == c for x in conds])) for c in dict.fromkeys(conds)],
    ]:
        for label, sel in (("flagged (p < 0.5)", m & flagged), ("unflagged", m & ~flagged)):
            if sel.any():
                rows.append(
                    [
                        name,
                        label,
                        int(sel.sum()),
                        f"{e[sel].mean():.2f}",
                        f"{np.median(e[sel]):.2f}",
                        f"{hit[sel].mean():.2f}",
                    ]
                )
    lines += [
        "",
        *table(["targets", "matches", "n", "MRE (mm)", "median", "<=5 mm"], rows, "llrrrr"),
    ]
    publish("calibration", lines, args.write)
    if args.ship:
        out = ship_checkpoint(
            args.model, ROOT / "src" / "anatomap" / "zoo" / args.ship, args.summary, calibration=cal
        )
        print(f"shipped {out}")


if __name__ == "__main__":
    main()
