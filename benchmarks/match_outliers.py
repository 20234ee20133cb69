"""Outlier rejection from the geometry of many matches, and sub-voxel refinement (issue 14).

On the transfer benchmark's pairs (``anatomap.eval.transfer``: MNI152 T1 template with its
Dosenbach landmarks -> held-out synthetic targets under the four CONDITIONS, exact true
landmarks), the model's matches are flagged by

(a) the calibrated score: P(within 5 mm) < 0.5 (the model's ``meta["calibration"]``),
(b) the robust affine consistency check (``anatomap.infer.consistency.affine_consistency``),
(c) SAMv2's fixed-point test: match back into the template (``fixed_point_check``),
(d) the union of the three (and the union of the two free ones, (a) or (b)),

and each flag is scored: the mean error of flagged and unflagged matches, the share of
> 10 mm errors caught (recall) and the share of flagged matches truly > 5 mm off
(precision). Also: the same matches with ``match_points(subvoxel=True)``; the relative cost
of the back-match (one more ``match_points`` call against the forward match, and against the
embedding + match a target costs); threshold sweeps of (b) and (c); how far true
correspondences lie from their own affine fit; and a repair of (b)'s outliers (the affine
prediction, or a local re-search around it).

    python benchmarks/match_outliers.py [--model brain-mri] [--targets 3] [--points 50] [--write]

``--write`` replaces the ``match_outliers`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command, machine, publish, table

from anatomap.checkpoint import load_model
from anatomap.data.cache import CachedSubject
from anatomap.data.synth import LabelSource
from anatomap.eval import landmarks as lm
from anatomap.eval.matchers import DenseMatcher
from anatomap.eval.transfer import CONDITIONS, ConditionResult, run_transfer
from anatomap.infer.calibration import probability
from anatomap.infer.consistency import (
    DEFAULT_BACK_MM,
    DEFAULT_MIN_SHARE,
    DEFAULT_THRESHOLD_MM,
    affine_consistency,
    back_match,
    crop_embedding,
)
from anatomap.infer.embed import DenseEmbedding, DenseModel, embed_array
from anatomap.infer.match import match_points, prepare_target

NAME = "brain-mri"
REPAIR_RADII_MM = (10.0, 20.0)


@dataclass
class Extra:
    """What the probe measured on one pair besides the plain match."""

    subvoxel_mm: np.ndarray
    back_mm: np.ndarray
    forward_s: float
    back_s: float
    repair: dict[float, dict[int, np.ndarray]] = field(
        default_factory=dict
    )  # radius -> point -> local re-search


class Probe(DenseMatcher):
    """The model's matcher, also recording the sub-voxel matches, the back-matches (timed
    against the forward match) and a local re-search around the affine prediction of every
    match the affine check flags."""

    def __init__(self, model: DenseModel) -> None:
        super().__init__(NAME, model)
        self.extra: dict[str, Extra] = {}

    def prepare(self, subject: CachedSubject) -> DenseEmbedding:
        """The subject's embedding, its maps as float32 (whatever ``embed_array`` stores)."""
        image = np.asarray(subject.image, np.float32)
        emb = embed_array(self.model, image, subject.affine, window=self.window)
        emb = replace(emb, coarse=emb.coarse.float(), fine=emb.fine.float())
        prepare_target(emb)
        return emb

    def match(self, template, template_state, points_mm, target, target_state) -> lm.MatchResult:
        t0 = time.perf_counter()
        res = match_points(template_state, points_mm, target_state)
        t1 = time.perf_counter()
        back = back_match(template_state, target_state, res.points_mm)
        t2 = time.perf_counter()
        sub = match_points(template_state, points_mm, target_state, subvoxel=True).points_mm
        ex = Extra(sub, back, t1 - t0, t2 - t1)
        chk = affine_consistency(points_mm, res.points_mm, res.scores)
        if chk.suspect is not None and chk.predicted_mm is not None:
            for radius in REPAIR_RADII_MM:
                ex.repair[radius] = {}
                for i in np.flatnonzero(chk.suspect):
                    crop = crop_embedding(target_state, chk.predicted_mm[i], radius)
                    found = match_points(template_state, points_mm[i : i + 1], crop)
                    ex.repair[radius][int(i)] = found.points_mm[0]
        self.extra[target.id] = ex
        return lm.MatchResult(res.points_mm, res.scores)


@dataclass
class Cond:
    """Per-match arrays of one condition (pairs concatenated)."""

    err: np.ndarray
    err_sub: np.ndarray
    prob: np.ndarray
    back: np.ndarray
    checks: dict[Setting, np.ndarray]  # affine setting -> suspect (False without verdict)
    verdicts: list[str]
    true_dev: np.ndarray  # true correspondences' distance from their own affine fit
    err_pred: np.ndarray  # error of the affine prediction (NaN without a fit)
    err_repair: dict[float, np.ndarray]  # radius -> error of the local re-search (NaN: not run)
    forward_s: float
    back_s: float
    target_s: float  # embedding + forward match, per target


Setting = tuple[float, float]  # affine threshold (mm), min_share
DEFAULT: Setting = (DEFAULT_THRESHOLD_MM, DEFAULT_MIN_SHARE)
SETTINGS: tuple[Setting, ...] = (
    (7.5, 0.4),
    (10.0, 0.3),
    DEFAULT,
    (10.0, 0.5),
    (12.5, 0.4),
    (15.0, 0.4),
    (20.0, 0.4),
)
BACK_THRESHOLDS = (5.0, 7.5, 10.0, 15.0, 20.0)


def _true_deviation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    x = np.concatenate([p, np.ones((len(p), 1))], 1)
    m = np.linalg.lstsq(x, q, rcond=None)[0]
    return np.linalg.norm(x @ m - q, axis=1)


def _collect(r: ConditionResult, probe: Probe, calibration: dict) -> Cond:
    keys = ["err", "err_sub", "prob", "back", "true_dev", "err_pred"]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    checks: dict[Setting, list[np.ndarray]] = {k: [] for k in SETTINGS}
    repairs: dict[float, list[np.ndarray]] = {r: [] for r in REPAIR_RADII_MM}
    verdicts, fwd, bck, tgt = [], 0.0, 0.0, 0.0
    for p in r.pairs:
        ex = probe.extra[p.target]
        q, s = p.matched_mm[NAME], p.scores[NAME]
        parts["err"].append(p.errors(NAME))
        parts["err_sub"].append(np.linalg.norm(ex.subvoxel_mm - p.true_mm, axis=1))
        parts["prob"].append(probability(calibration, s))
        parts["back"].append(np.linalg.norm(ex.back_mm - p.template_mm, axis=1))
        parts["true_dev"].append(_true_deviation(p.template_mm, p.true_mm))
        for t, share in SETTINGS:
            c = affine_consistency(p.template_mm, q, s, threshold_mm=t, min_share=share)
            checks[t, share].append(np.zeros(len(q), bool) if c.suspect is None else c.suspect)
            if (t, share) == DEFAULT:
                verdicts.append(c.verdict)
                pred = c.predicted_mm if c.verdict == "ok" else None
                pred = np.full_like(q, np.nan) if pred is None else pred
                parts["err_pred"].append(np.linalg.norm(pred - p.true_mm, axis=1))
        for radius in REPAIR_RADII_MM:
            rep = np.full(len(q), np.nan)
            for i, pt in ex.repair.get(radius, {}).items():
                rep[i] = np.linalg.norm(pt - p.true_mm[i])
            repairs[radius].append(rep)
        fwd, bck = fwd + ex.forward_s, bck + ex.back_s
        tgt += r.prepare_s[NAME][p.target] + ex.forward_s
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    suspect = {t: np.concatenate(v) for t, v in checks.items()}
    repaired = {r: np.concatenate(v) for r, v in repairs.items()}
    return Cond(
        **arrays,
        checks=suspect,
        err_repair=repaired,
        verdicts=verdicts,
        forward_s=fwd,
        back_s=bck,
        target_s=tgt,
    )


def _flags(c: Cond, back_mm: float = DEFAULT_BACK_MM) -> dict[str, np.ndarray]:
    score = c.prob < 0.5
    affine = c.checks[DEFAULT]
    back = ~(c.back <= back_mm)
    return {
        "(a) score p < 0.5": score,
        f"(b) affine > {DEFAULT_THRESHOLD_MM:g} mm": affine,
        f"(c) back-match > {DEFAULT_BACK_MM:g} mm": back,
        "(a) or (b)": score | affine,
        "(d) union": score | affine | back,
    }


def _quality(err: np.ndarray, flag: np.ndarray) -> list[str]:
    """n flagged, MRE flagged / unflagged, recall of > 10 mm, precision (> 5 mm)."""

    def mre(sel: np.ndarray) -> str:
        return f"{err[sel].mean():.2f}" if sel.any() else "-"

    big = err > 10
    recall = f"{flag[big].mean():.2f}" if big.any() else "-"
    precision = f"{(err[flag] > 5).mean():.2f}" if flag.any() else "-"
    return [f"{int(flag.sum())}", mre(flag), mre(~flag), recall, precision]


def _summary_rows(conds: dict[str, Cond]) -> list[list[str]]:
    rows = []
    for name, c in conds.items():
        ok = sum(v == "ok" for v in c.verdicts)
        rows.append(
            [
                name,
                str(len(c.err)),
                f"{c.err.mean():.2f}",
                f"{(c.err <= 5).mean():.2f}",
                f"{(c.err > 10).mean():.2f}",
                f"{c.err_sub.mean():.2f}",
                f"{(c.err_sub <= 5).mean():.2f}",
                f"{np.median(c.err):.2f} / {np.median(c.err_sub):.2f}",
                f"{ok}/{len(c.verdicts)}",
                f"{c.back_s / c.forward_s:.2f}x / {c.back_s / c.target_s:.2f}x",
            ]
        )
    return rows


def _flag_rows(conds: dict[str, Cond]) -> list[list[str]]:
    rows = []
    pooled = _pool(conds)
    for name, c in [*conds.items(), ("all", pooled)]:
        for label, flag in _flags(c).items():
            rows.append([name, label, *_quality(c.err, flag)])
    return rows


def _pool(conds: dict[str, Cond]) -> Cond:
    cs = list(conds.values())

    def cat(get: Callable[[Cond], np.ndarray]) -> np.ndarray:
        return np.concatenate([get(c) for c in cs])

    return Cond(
        err=cat(lambda c: c.err),
        err_sub=cat(lambda c: c.err_sub),
        prob=cat(lambda c: c.prob),
        back=cat(lambda c: c.back),
        checks={k: cat(lambda c, k=k: c.checks[k]) for k in SETTINGS},
        verdicts=[v for c in cs for v in c.verdicts],
        true_dev=cat(lambda c: c.true_dev),
        err_pred=cat(lambda c: c.err_pred),
        err_repair={r: cat(lambda c, r=r: c.err_repair[r]) for r in REPAIR_RADII_MM},
        forward_s=sum(c.forward_s for c in cs),
        back_s=sum(c.back_s for c in cs),
        target_s=sum(c.target_s for c in cs),
    )


def _sweep_rows(conds: dict[str, Cond]) -> list[list[str]]:
    rows = []
    for name, c in [*conds.items(), ("all", _pool(conds))]:
        for t, share in SETTINGS:
            label = f"(b) affine > {t:g} mm, share > {share:g}"
            rows.append([name, label, *_quality(c.err, c.checks[t, share])])
        for t in BACK_THRESHOLDS:
            rows.append([name, f"(c) back-match > {t:g} mm", *_quality(c.err, ~(c.back <= t))])
    return rows


def _deviation_rows(conds: dict[str, Cond]) -> list[list[str]]:
    rows = []
    for name, c in conds.items():
        q = np.percentile(c.true_dev, [50, 95, 99, 100])
        good = c.err <= 5
        back = f"{np.mean(c.back[good]):.1f}" if good.any() else "-"
        rows.append([name, *[f"{v:.1f}" for v in q], back])
    return rows


def _repair_rows(conds: dict[str, Cond]) -> list[list[str]]:
    rows = []
    for name, c in [*conds.items(), ("all", _pool(conds))]:
        sel = c.checks[DEFAULT]
        fit = np.isfinite(c.err_pred) & ~sel
        kept = [f"{c.err[fit].mean():.2f} / {c.err_pred[fit].mean():.2f}" if fit.any() else "-"]
        if not sel.any():
            rows.append([name, "0", "-", "-", *["-"] * len(REPAIR_RADII_MM), *kept])
            continue
        errs = [c.err, c.err_pred, *[c.err_repair[r] for r in REPAIR_RADII_MM]]
        cells = [f"{np.nanmean(v[sel]):.2f}" for v in errs]
        rows.append([name, str(int(sel.sum())), *cells, *kept])
    return rows


def _report(args: argparse.Namespace, conds: dict[str, Cond], minutes: float) -> list[str]:
    lines = [
        "### Outlier flags and sub-voxel refinement of `brain-mri` matches",
        "",
        f"The transfer benchmark's pairs: the MNI152 T1 (2 mm) with its Dosenbach landmarks "
        f"-> {args.targets} held-out targets per condition, up to {args.points} landmarks "
        "each, exact true positions. Flags: (a) calibrated P(within 5 mm) < 0.5; (b) robust "
        f"affine consistency (`anatomap.infer.consistency.affine_consistency`, RANSAC + "
        f"least squares, {DEFAULT_THRESHOLD_MM:g} mm; no verdict unless the affine explains "
        f"over {DEFAULT_MIN_SHARE:g} of the matches); (c) SAMv2's fixed-point test (match "
        "back into the template, "
        f"{DEFAULT_BACK_MM:g} mm); (d) their union. Machine: {machine()}, "
        f"{args.threads} thread(s), shared ({minutes:.1f} min).",
        f"Command: `{command()}`",
        "",
        "Matches, sub-voxel refinement (`match_points(subvoxel=True)`, same pairs) and the "
        "cost of the back-match (its time against the forward match, and against embedding "
        "+ forward match per target):",
        "",
    ]
    lines += table(
        [
            "condition",
            "matches",
            "MRE (mm)",
            "<=5 mm",
            ">10 mm",
            "MRE subvoxel",
            "<=5 mm subvoxel",
            "median off / on",
            "affine verdicts",
            "back-match cost",
        ],
        _summary_rows(conds),
    )
    heads = ["condition", "flag", "flagged", "MRE flagged", "MRE unflagged"]
    heads += ["recall >10 mm", "precision >5 mm"]
    lines += ["", "Flags (recall: share of > 10 mm errors flagged; precision: share of flagged "]
    lines[-1] += "matches > 5 mm off):"
    lines += ["", *table(heads, _flag_rows(conds), "llrrrrr"), ""]
    lines += [
        "Settings of (b) and (c) (share: the least share of matches the affine must explain for a verdict):",
        "",
        *table(heads, _sweep_rows(conds), "llrrrrr"),
    ]
    lines += [
        "",
        "How far true correspondences lie from their own least-squares affine (mm; what the "
        "affine threshold must allow), and the mean back-match distance of good (<= 5 mm) "
        "matches:",
        "",
    ]
    dev_heads = ["condition", "median", "95%", "99%", "max", "back-match of good matches"]
    lines += table(dev_heads, _deviation_rows(conds))
    lines += [
        "",
        "Repairing (b)'s outliers: mean error (mm) of the match, of the affine prediction, and "
        "of a local re-search around the prediction (`crop_embedding` + `match_points`); and "
        "for the inliers of pairs with a verdict, the match against the affine prediction:",
        "",
    ]
    radii = [f"re-search {r:g} mm" for r in REPAIR_RADII_MM]
    heads = ["condition", "flagged", "match", "affine prediction", *radii]
    lines += table([*heads, "inliers: match / affine"], _repair_rows(conds))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="brain-mri", help="checkpoint, run or shipped name")
    ap.add_argument("--targets", type=int, default=3, help="targets per condition")
    ap.add_argument("--points", type=int, default=50, help="landmarks per target")
    ap.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    encoder, objective, meta = load_model(args.model)
    calibration = meta.get("calibration")
    if not calibration:
        raise SystemExit(f"{args.model}: no calibration in its meta.json (a shipped model has)")
    probe = Probe(DenseModel(encoder, objective))
    t0 = time.perf_counter()
    results = run_transfer(
        [probe],
        LabelSource.brain("dosenbach"),
        args.conditions,
        args.targets,
        args.points,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    conds = {r.name: _collect(r, probe, calibration) for r in results}
    publish("match_outliers", _report(args, conds, (time.perf_counter() - t0) / 60), args.write)


if __name__ == "__main__":
    main()
