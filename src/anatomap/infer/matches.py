"""The typed result of :func:`anatomap.match`: :class:`Matches` (numpy arrays per target and
point) and its writers: CSV / JSON (``matches.csv``), 3D Slicer markups, sphere label images
and a pandas DataFrame."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anatomap.errors import AnatomapError
from anatomap.infer.points import voxel_indices, write_match_markups

Grid = tuple[np.ndarray, tuple[int, ...]]
"""A voxel grid: its 4x4 voxel -> world (RAS+ mm) affine and its shape."""


@dataclass
class Matches:
    """The matches of ``N`` template points in ``T`` targets (what ``anatomap.match``
    returns); ``[T, N]`` arrays are in target order, then point order.

    Attributes:
        names: ``[N]`` point names.
        template_mm: ``[N, 3]`` template points, world RAS+ mm.
        targets: the ``T`` targets, as given (paths; ``image<n>`` for in-memory scans).
        points_mm: ``[T, N, 3]`` matches, world RAS+ mm.
        voxels: ``[T, N, 3]`` the matches as continuous voxel indices of each target's own
            grid (a scan's array; the preprocessed grid of a saved embedding); NaN if unknown.
        scores: ``[T, N]`` similarity at the match (mean coarse + fine cosine, in [-1, 1]).
        low_confidence: ``[T, N]`` flagged matches: P(within 5 mm) < 0.5 for a calibrated
            model (else a score below ``low_score``), or inconsistent with the others.
        p_within_5mm: ``[T, N]`` calibrated P(error <= 5 mm) (shipped models), else None.
        grids: each target's grid (affine, shape), for :meth:`to_spheres`; None if unknown.
        consistent: ``[T, N]`` 1 where a match agrees with the robust affine of all the
            target's matches, 0 where it is off by more than its threshold (a gross
            failure), NaN without a verdict (fewer than 8 points, no consistent majority;
            :func:`~anatomap.infer.consistency.affine_consistency`); None if not checked.
        embeddings: ``(template, [targets])`` ``DenseEmbedding`` s with
            ``anatomap.match(keep_embeddings=True)``, else None.
    """

    names: np.ndarray
    template_mm: np.ndarray
    targets: list[str]
    points_mm: np.ndarray
    voxels: np.ndarray
    scores: np.ndarray
    low_confidence: np.ndarray
    p_within_5mm: np.ndarray | None = None
    grids: list[Grid | None] = field(default_factory=list, repr=False)
    consistent: np.ndarray | None = None
    embeddings: tuple[Any, list[Any]] | None = field(default=None, repr=False)

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        template_mm: np.ndarray,
        targets: Sequence[str],
        results: Sequence[Any],
        grids: Sequence[Grid | None],
        p_within_5mm: np.ndarray | None,
        low_score: float,
        consistent: np.ndarray | None = None,
    ) -> Matches:
        """From one ``match_points`` result per target: scores below ``low_score`` are low
        confidence, or with a calibration P(within 5 mm) < 0.5; so are matches that
        ``consistent`` marks 0."""
        pts = np.stack([np.asarray(r.points_mm, np.float64) for r in results])
        scores = np.stack([np.asarray(r.scores, np.float64) for r in results])
        ijk = np.stack(
            [voxel_indices(g[0] if g else None, p) for g, p in zip(grids, pts, strict=True)]
        )
        low = p_within_5mm < 0.5 if p_within_5mm is not None else scores < low_score
        if consistent is not None:
            low = low | (consistent == 0.0)
        return cls(
            np.asarray([str(n) for n in names]),
            np.asarray(template_mm, np.float64).reshape(-1, 3),
            [str(t) for t in targets],
            pts,
            ijk,
            scores,
            np.asarray(low, bool),
            p_within_5mm,
            list(grids),
            consistent,
        )

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (target, point), the columns of ``matches.csv``: ``target, name,
        template_x/y/z, x, y, z, i, j, k`` (2 decimals; None if unknown), ``score``,
        ``low_confidence``, with a calibration ``p_within_5mm`` and, when checked,
        ``consistent`` (true, false or None: no verdict)."""
        out: list[dict[str, Any]] = []
        for t, target in enumerate(self.targets):
            ijk = np.round(self.voxels[t], 2)
            for n, name in enumerate(self.names):
                row: dict[str, Any] = {"target": target, "name": str(name)}
                for axis, c in enumerate("xyz"):
                    row[f"template_{c}"] = round(float(self.template_mm[n, axis]), 3)
                for axis, c in enumerate("xyz"):
                    row[c] = round(float(self.points_mm[t, n, axis]), 3)
                for axis, c in enumerate("ijk"):
                    v = float(ijk[n, axis])
                    row[c] = None if math.isnan(v) else v
                row["score"] = round(float(self.scores[t, n]), 4)
                row["low_confidence"] = bool(self.low_confidence[t, n])
                if self.p_within_5mm is not None:
                    row["p_within_5mm"] = round(float(self.p_within_5mm[t, n]), 3)
                if self.consistent is not None:
                    c = float(self.consistent[t, n])
                    row["consistent"] = None if math.isnan(c) else bool(c)
                out.append(row)
        return out

    def to_csv(self, path: str | Path) -> Path:
        """Write :meth:`rows` as a CSV (atomically)."""
        from anatomap.io.atomic import atomic_write_text

        rows = self.rows()
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write_text(Path(path), buf.getvalue(), what="matches")

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`rows` as a JSON list (atomically)."""
        from anatomap.io.atomic import atomic_write_json

        return atomic_write_json(Path(path), self.rows(), what="matches")

    def to_slicer(self, path: str | Path) -> Path:
        """Write 3D Slicer markups (``.mrk.json``): one point list per target, LPS."""
        return write_match_markups(path, self.rows())

    def save(self, path: str | Path) -> list[Path]:
        """``anatomap match --out``: Slicer markups for a name ending ``.mrk.json``, else the
        CSV and the same rows as ``PATH.json``. Returns the files written."""
        p = Path(path)
        if p.name.lower().endswith(".mrk.json"):
            return [self.to_slicer(p)]
        return [self.to_csv(p), self.to_json(p.with_name(p.name + ".json"))]

    def to_spheres(self, path: str | Path, radius_mm: float = 2.0) -> list[Path]:
        """Label images of spheres at the matches, on each target's own grid (label ``n + 1``
        = point ``n``): ``path`` for one target, ``path`` with the target's name before the
        suffix for several (:func:`~anatomap.infer.spheres.sphere_paths`). Returns them."""
        from anatomap.infer.spheres import check_spheres, sphere_paths, write_spheres

        check_spheres(path, radius_mm)
        grids = []
        for target, grid in zip(self.targets, self.grids, strict=True):
            if grid is None:  # checked for every target before any file is written
                raise AnatomapError(
                    f"{target}: its image grid is unknown (an embedding without image_affine); "
                    "match the scan itself to draw spheres on it"
                )
            grids.append(grid)
        paths = sphere_paths(path, self.targets)
        for t, (p, (affine, shape)) in enumerate(zip(paths, grids, strict=True)):
            write_spheres(p, shape, affine, self.points_mm[t], radius_mm)
        return paths

    def to_dataframe(self) -> Any:
        """:meth:`rows` as a ``pandas.DataFrame`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise AnatomapError(
                "Matches.to_dataframe needs pandas (pip install pandas); .rows() gives the "
                "same table as dicts"
            ) from None
        return pd.DataFrame(self.rows())
