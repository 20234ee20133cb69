"""Transfer evaluation: atlas -> unseen-subject landmark matching on held-out synthetic data.

The question a new user asks (issue 14): given landmarks on a template scan, where are they
in *my* scan, which the model never saw? The template is the MNI152 2009 T1 at 2 mm with its
landmarks (Dosenbach et al. 2010 or Power et al. 2011); each target is drawn by
:func:`anatomap.data.synth.synth_subject` under one of :data:`CONDITIONS`, with seeds that
training never uses, and its true landmarks are the template's pushed through the subject's
exact map (:meth:`~anatomap.data.synth.SynthSubject.to_subject`). Domain randomisation from
label maps follows SynthSeg (Billot et al. 2023) and SynthMorph (Hoffmann et al. 2022).

Every matcher sees the same (template, target) pairs and the same landmark subset. Time per
target = the matcher's ``prepare`` on the target (the embedding, for a model) + its
``match``; the template's own ``prepare`` is done once and not counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anatomap import geometry
from anatomap.data.cache import CachedSubject
from anatomap.data.synth import LabelSource, SynthConfig, synth_subject
from anatomap.data.synth.subject import _normalise, in_memory_subject
from anatomap.eval import landmarks as lm

HELD_OUT_CONTRASTS: tuple[str, ...] = ("t2", "pd", "flair", "ct")
"""Contrast families the shipped ``brain-mri`` model never saw in training."""

_LARGER = {"svf_max_mm": [14.0, 7.0], "rotation_deg": 20.0, "translation_mm": 20.0}
_CLEAN = {  # the real T1 under a warp only: no painting, no acquisition artefacts
    "contrasts": ["real"],
    "real_fraction": 1.0,
    "bias_max": 0.0,
    "lowres_probability": 0.0,
    "blur_max": 0.0,
    "noise_max": 0.0,
    "gamma_log_max": 0.0,
}
_HELD = {"contrasts": list(HELD_OUT_CONTRASTS), "real_fraction": 0.0, **_LARGER}

CONDITIONS: dict[str, dict[str, Any]] = {
    "synthetic, held-out contrasts, full FOV": {**_HELD, "fov_cut_probability": 0.0},
    "synthetic, held-out contrasts, partial FOV": {**_HELD, "fov_cut_probability": 1.0},
    "MNI152 T1 under warps, full FOV": {**_CLEAN, **_LARGER, "fov_cut_probability": 0.0},
    "MNI152 T1 under warps, partial FOV": {**_CLEAN, **_LARGER, "fov_cut_probability": 1.0},
}
"""Condition -> :class:`SynthConfig` fields (larger deformations than training's
``svf_max_mm=[10, 5]``; partial = 1-2 axes cut through the anatomy, 40-90% kept)."""

SEED = 914_000
"""Base seed of the evaluation subjects (training cohorts use small seeds)."""


@dataclass
class ConditionResult:
    """One condition: its targets, their contrasts and every matcher's pairs and times."""

    name: str
    targets: list[str]
    contrasts: dict[str, str]
    pairs: list[lm.PairResult] = field(default_factory=list)
    prepare_s: dict[str, dict[str, float]] = field(default_factory=dict)

    def errors(self, matcher: str) -> np.ndarray:
        chunks = [p.errors(matcher) for p in self.pairs]
        return np.concatenate(chunks) if chunks else np.zeros(0)

    def scores(self, matcher: str) -> np.ndarray:
        chunks = [p.scores[matcher] for p in self.pairs]
        return np.concatenate(chunks) if chunks else np.zeros(0)

    def seconds_per_target(self, matcher: str) -> float:
        prep = self.prepare_s.get(matcher, {})
        return float(np.mean([prep.get(p.target, 0.0) + p.match_s[matcher] for p in self.pairs]))

    def metrics(self, matcher: str) -> dict[str, float]:
        out = lm.landmark_metrics(self.errors(matcher))
        out["s_per_target"] = self.seconds_per_target(matcher)
        out["failed_pairs"] = float(sum(matcher in p.errors_msg for p in self.pairs))
        return out


def template_subject(source: LabelSource, subject_id: str = "mni152") -> CachedSubject:
    """The source's own intensities (the MNI152 T1) as a cache entry, with its landmarks."""
    assert source.image is not None
    image, affine = geometry.reorient(source.image, source.affine, "RAS")
    anatomy, _ = geometry.reorient(source.classes > 0, source.affine, "RAS")
    meta = {"subject": subject_id, "affine": affine.tolist(), "shape": list(image.shape)}
    meta |= {"present": [True], "labels": []}
    meta["landmarks"] = {
        n: [float(v) for v in p]
        for n, p in zip(source.landmark_names, source.landmark_mm, strict=True)
    }
    fg = np.argwhere(anatomy).astype(np.int32)
    return CachedSubject(Path(), meta, _image=_normalise(image, "mri")[None], _foreground=fg)


def condition_targets(
    source: LabelSource, condition: str, n: int, seed: int = SEED
) -> tuple[list[CachedSubject], dict[str, str]]:
    """``n`` targets of ``condition`` (cache entries with their true landmarks) and the
    contrast family of each."""
    k = list(CONDITIONS).index(condition)
    cfg = SynthConfig(**CONDITIONS[condition])
    subs, contrasts = [], {}
    for i in range(n):
        s = synth_subject(source, cfg, [seed, k, i])
        sid = f"c{k}-t{i}"
        cached = in_memory_subject(s, sid, "mri")
        names, xyz = s.landmarks
        cached.meta["landmarks"] = {
            nm: [float(v) for v in p] for nm, p in zip(names, xyz, strict=True)
        }
        subs.append(cached)
        contrasts[sid] = s.contrast
    return subs, contrasts


def run_condition(
    matchers: Sequence[Any],
    template: CachedSubject,
    template_states: dict[str, Any],
    name: str,
    targets: Sequence[CachedSubject],
    contrasts: dict[str, str],
    max_points: int | None = 50,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> ConditionResult:
    """Match template -> each target with every matcher (same landmarks for all)."""
    res = ConditionResult(name, [t.id for t in targets], contrasts)
    res.prepare_s = {m.name: {} for m in matchers}
    for tgt in targets:
        subs = {template.id: template, tgt.id: tgt}
        pr = lm._new_pair(subs, template.id, tgt.id, max_points, seed, set())
        if pr is None:
            continue
        for m in matchers:
            t0 = time.perf_counter()
            state = m.prepare(tgt)
            res.prepare_s[m.name][tgt.id] = time.perf_counter() - t0
            lm._match_pair(m, pr, template, template_states[m.name], tgt, state)
        res.pairs.append(pr)
        if log:
            errs = ", ".join(f"{m.name} {np.nanmean(pr.errors(m.name)):.1f}" for m in matchers)
            log(f"{name} | {tgt.id} ({contrasts[tgt.id]}, {len(pr.names)} pts): {errs} mm")
    return res


def save_matcher(
    results: Sequence[ConditionResult], matcher: str, path: str | Path, note: str = ""
) -> None:
    """One matcher's answers on every pair (JSON), for :func:`merge_matcher` in a later run
    (long baselines can run once while a model trains; pairs are deterministic)."""
    out = {
        r.name: {
            p.target: {
                "names": p.names,
                "matched_mm": p.matched_mm[matcher].tolist(),
                "scores": [None if np.isnan(s) else float(s) for s in p.scores[matcher]],
                "match_s": p.match_s[matcher],
                "prepare_s": r.prepare_s[matcher].get(p.target, 0.0),
                "error": p.errors_msg.get(matcher),
            }
            for p in r.pairs
        }
        for r in results
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"matcher": matcher, "note": note, "conditions": out}))


def merge_matcher(results: Sequence[ConditionResult], path: str | Path) -> tuple[str, str]:
    """Add a matcher saved by :func:`save_matcher` to ``results`` (the same pairs and
    landmarks, checked); returns its name and note."""
    saved = json.loads(Path(path).read_text())
    name = saved["matcher"]
    for r in results:
        r.prepare_s[name] = {}
        for p in r.pairs:
            rec = saved["conditions"][r.name][p.target]
            if rec["names"] != p.names:
                raise ValueError(f"{path}: {r.name} / {p.target} has other landmarks")
            p.matched_mm[name] = np.asarray(rec["matched_mm"], np.float64)
            p.scores[name] = np.array([np.nan if s is None else s for s in rec["scores"]])
            p.match_s[name] = float(rec["match_s"])
            r.prepare_s[name][p.target] = float(rec["prepare_s"])
            if rec["error"]:
                p.errors_msg[name] = rec["error"]
    return name, str(saved.get("note", ""))


def run_transfer(
    matchers: Sequence[Any],
    source: LabelSource | None = None,
    conditions: Sequence[str] = tuple(CONDITIONS),
    n_targets: int = 5,
    max_points: int | None = 50,
    log: Callable[[str], None] | None = None,
) -> list[ConditionResult]:
    """Template (``source``'s own T1, default the MNI152 brain with Dosenbach landmarks) ->
    ``n_targets`` held-out targets of each condition, with every matcher on the same pairs
    (the template is prepared once per matcher, not timed)."""
    source = source or LabelSource.brain("dosenbach")
    template = template_subject(source)
    states = {m.name: m.prepare(template) for m in matchers}
    results = []
    for cond in conditions:
        targets, contrasts = condition_targets(source, cond, n_targets)
        results.append(
            run_condition(matchers, template, states, cond, targets, contrasts, max_points, log=log)
        )
    return results


def summary_table(results: Sequence[ConditionResult], matchers: Sequence[str]) -> list[str]:
    """Plain-text rows: condition, matcher, mean error, share within 5 mm, seconds/target."""
    head = f"{'condition':<44} {'matcher':<22} {'mean err mm':>11} {'<=5 mm':>7} {'s/target':>9}"
    lines = [head]
    for r in results:
        for m in matchers:
            if not r.pairs or m not in r.pairs[0].matched_mm:
                continue
            x = r.metrics(m)
            lines.append(
                f"{r.name:<44} {m:<22} {x['mre_mm']:>11.2f} {x['cpm@5']:>7.2f} "
                f"{x['s_per_target']:>9.1f}"
            )
    return lines
