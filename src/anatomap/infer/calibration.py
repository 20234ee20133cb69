"""A calibrated match score: the probability that a match lies within ``radius_mm`` of the
truth, as a monotone function of the raw score (isotonic regression; Zadrozny & Elkan,
KDD 2002), fitted on held-out synthetic subjects whose true positions are exact.

The calibration is a small JSON-ready dict stored in a shipped model's ``meta.json``
(``calibration``): ``{"method": "isotonic", "radius_mm": 5.0, "x": [...], "y": [...]}``;
:func:`probability` interpolates it. A match whose probability is below one half is the
natural low-confidence flag. :func:`reliability` and :func:`reliability_plot` check it on
other subjects (predicted probability against the observed share within the radius).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def fit_calibration(
    scores: np.ndarray, errors_mm: np.ndarray, radius_mm: float = 5.0, note: str = ""
) -> dict[str, Any]:
    """Isotonic fit of ``P(error <= radius_mm | score)`` (increasing in the score)."""
    from sklearn.isotonic import IsotonicRegression

    s = np.asarray(scores, np.float64).ravel()
    e = np.asarray(errors_mm, np.float64).ravel()
    ok = np.isfinite(s) & np.isfinite(e)
    if ok.sum() < 10:
        raise ValueError("calibration needs at least 10 scored matches")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(s[ok], (e[ok] <= radius_mm).astype(np.float64))
    return {
        "method": "isotonic",
        "radius_mm": float(radius_mm),
        "x": [round(float(v), 5) for v in iso.X_thresholds_],
        "y": [round(float(v), 5) for v in iso.y_thresholds_],
        "n": int(ok.sum()),
        "note": note,
    }


def probability(calibration: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """The calibrated probability of each raw score (clipped at the fitted range)."""
    x = np.asarray(calibration["x"], np.float64)
    y = np.asarray(calibration["y"], np.float64)
    return np.interp(np.asarray(scores, np.float64), x, y)


def reliability(prob: np.ndarray, hit: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per probability bin: mean predicted probability, observed share of hits, count."""
    p = np.asarray(prob, np.float64).ravel()
    h = np.asarray(hit, bool).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        if m.any():
            rows.append(
                {"predicted": float(p[m].mean()), "observed": float(h[m].mean()), "n": int(m.sum())}
            )
    return rows


def reliability_plot(prob: np.ndarray, hit: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Reliability diagram (observed share within the radius against predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = reliability(prob, hit)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
    ax.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "o-", label="calibrated")
    for r in rows:
        ax.annotate(
            str(r["n"]),
            (r["predicted"], r["observed"]),
            fontsize=6,
            xytext=(3, -8),
            textcoords="offset points",
        )
    ax.set_xlabel("predicted P(error <= 5 mm)")
    ax.set_ylabel("observed share within 5 mm")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
