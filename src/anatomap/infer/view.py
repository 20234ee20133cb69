"""``anatomap view``: an interactive match viewer, one self-contained HTML page (NiiVue).

Template and target are shown side by side as orthogonal slices, the matched points as
markers coloured by score (or by the calibrated P(within 5 mm) of a shipped model) on both.
Clicking the template finds that point in the target *in the page*: the page's script runs
the algorithm of :func:`anatomap.infer.match.match_points` (the 3 best coarse voxels, each
refined by the coarse + fine argmax among the fine voxels within the refinement radius, on
the fine grid) on reduced embeddings it carries, moves the target's crosshair to the match
and shows the combined similarity over the target as a heat map.

Reduction (:func:`reduce_embeddings`): per level (coarse, fine), one basis fitted on the
maps of all the page's scans together, so that dot products stay comparable across them: the
top eigenvectors of ``sum X^T X`` (uncentred PCA: the projection that best keeps the vectors,
hence their dot products). Projected vectors are re-normalised to unit length and stored as
int8 with an offset and a scale per component.

What a click is checked against: ``match_points`` run on the same de-quantised reduced
embeddings (:meth:`Reduction.embedding`), which the page reproduces up to float rounding
(``tests/test_view.py``: within one fine voxel). Not the full-precision match: where the
full similarity has two near-equal peaks, the reduction's small errors can pick the other
one, so no number of int8 components makes the two agree everywhere (:func:`agreement`
measures how often they do; docs/viewer.md gives the rates and the page sizes). The fixed
markers are the full-precision matches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anatomap import geometry
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError
from anatomap.infer.embed import EMBEDDING_SUFFIX, DenseEmbedding, DenseModel, load_or_embed
from anatomap.infer.match import DEFAULT_LOW_SCORE, MatchResult, match_points
from anatomap.infer.view_page import (
    MAX_DISPLAY_VOXELS,
    MAX_PAGE_BYTES,
    b64,
    display_image,
    nifti_gz,
    render_page,
)

LEVELS = ("coarse", "fine")
DEFAULT_COMPONENTS = (32, 32)
"""Components kept of the coarse and the fine maps (fewer if the maps have fewer)."""
CANDIDATES = 3  # match_points' default
_BLOCK = 1 << 16  # rows per block when projecting


@dataclass
class ViewScan:
    """One scan of the page: its name, its embedding and the image shown (``None``: the
    first principal component of its fine map is shown instead)."""

    name: str
    emb: DenseEmbedding
    image: Volume | None = None

    @classmethod
    def from_path(cls, path: str | Path, emb: DenseEmbedding) -> ViewScan:
        """A scan (read to be shown) or a saved embedding (its scan, if still there)."""
        from anatomap.io import read_volume

        p = Path(path)
        if not p.name.endswith(EMBEDDING_SUFFIX):
            return cls(p.name, emb, read_volume(p))
        src = Path(emb.source) if emb.source else None
        if src is not None and src.exists() and not src.name.endswith(EMBEDDING_SUFFIX):
            return cls(p.name, emb, read_volume(src))
        return cls(p.name, emb, None)


@dataclass
class Reduction:
    """Reduced embeddings: per level a basis ``[D, K]`` and per component an offset and a
    scale (float32); per scan and level the int8 codes ``[*s, K]``. A value is
    ``code * scale + offset``, computed in float32 (as the page does)."""

    basis: dict[str, np.ndarray]
    offset: dict[str, np.ndarray]
    scale: dict[str, np.ndarray]
    codes: list[dict[str, np.ndarray]]

    def values(self, index: int, level: str) -> np.ndarray:
        """Scan ``index``'s de-quantised ``level`` map ``[*s, K]`` (float32)."""
        return self.codes[index][level].astype(np.float32) * self.scale[level] + self.offset[level]

    def embedding(self, index: int, like: DenseEmbedding) -> DenseEmbedding:
        """Scan ``index``'s de-quantised reduced maps (float32, as the page computes them)
        with the geometry of ``like`` (its full embedding)."""
        maps = [torch.from_numpy(self.values(index, lv)).movedim(-1, 0) for lv in LEVELS]
        return DenseEmbedding(
            maps[0],
            maps[1],
            np.asarray(like.coarse_affine, np.float64),
            np.asarray(like.fine_affine, np.float64),
            like.source,
            dict(like.meta),
            like.image_shape,
            like.image_affine,
        )


def _rows(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.movedim(0, -1).reshape(-1, fmap.shape[0])


def _basis(rows: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The top ``k`` eigenvectors ``[D, k]`` (float64) of ``sum X^T X`` over ``rows``, signed
    so that each one's largest entry is positive."""
    d = rows[0].shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    for r in rows:
        for block in r.split(_BLOCK):
            b = block.double()
            gram += b.T @ b
    basis = torch.linalg.eigh(gram)[1].flip(-1)[:, :k]
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return basis * torch.where(sign == 0, 1.0, sign)


def _check_components(components: Sequence[int]) -> tuple[int, int]:
    if len(components) != 2 or not all(
        isinstance(k, int | np.integer) and not isinstance(k, bool) and k >= 1 for k in components
    ):
        raise AnatomapError(
            f"components {tuple(components)!r}: must be two integers >= 1 (coarse, fine)"
        )
    return int(components[0]), int(components[1])


def reduce_embeddings(
    embs: Sequence[DenseEmbedding], components: Sequence[int] = DEFAULT_COMPONENTS
) -> Reduction:
    """Reduce every map to ``components`` (coarse, fine) dimensions with one basis per level
    fitted on all ``embs`` (see the module's docstring), re-normalise, quantise to int8: per
    component, the range of its values over all scans mapped onto codes -127..127."""
    ks = _check_components(components)
    basis, offset, scale = {}, {}, {}
    codes: list[dict[str, np.ndarray]] = [{} for _ in embs]
    for level, k in zip(LEVELS, ks, strict=True):
        maps = [getattr(e, level) for e in embs]
        dims = {int(m.shape[0]) for m in maps}
        if len(dims) != 1:
            raise AnatomapError(
                f"{level} embeddings of {sorted(dims)} dimensions: template and targets must "
                "come from the same model"
            )
        rows = [_rows(m) for m in maps]
        b = _basis(rows, min(k, dims.pop()))
        proj = [
            torch.cat([F.normalize(x.double() @ b, dim=1) for x in r.split(_BLOCK)]) for r in rows
        ]
        lo = torch.stack([p.amin(0) for p in proj]).amin(0)
        hi = torch.stack([p.amax(0) for p in proj]).amax(0)
        mid, step = ((lo + hi) / 2).float(), ((hi - lo) / 254).clamp_min(1e-30).float()
        for i, (p, m) in enumerate(zip(proj, maps, strict=True)):
            q = ((p - mid.double()) / step.double()).round().clamp(-127, 127).to(torch.int8)
            codes[i][level] = q.reshape(*m.shape[1:], -1).numpy()
        basis[level], offset[level], scale[level] = b.numpy(), mid.numpy(), step.numpy()
    return Reduction(basis, offset, scale, codes)


# -- the page's data --------------------------------------------------------------------------


def _map_entry(codes: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    aff = torch.as_tensor(np.asarray(affine, np.float64))
    return {
        "shape": [int(n) for n in codes.shape[:3]],
        "k": int(codes.shape[3]),
        "data": b64(np.ascontiguousarray(codes).tobytes()),
        "affine": aff.tolist(),
        "inv": torch.linalg.inv(aff).tolist(),  # as match.py inverts it
    }


def _scan_entry(scan: ViewScan, codes: dict[str, np.ndarray], max_voxels: int) -> dict[str, Any]:
    image = scan.image
    shown = "image"
    if image is None:  # no scan to show: the first principal component of the fine map
        image = Volume(codes["fine"][..., 0].astype(np.float32), scan.emb.fine_affine)
        shown = "first principal component of the fine embedding"
    return {
        "name": scan.name,
        "shown": shown,
        **display_image(image, max_voxels),
        **{lv: _map_entry(codes[lv], getattr(scan.emb, f"{lv}_affine")) for lv in LEVELS},
    }


def _target_entry(
    scan: ViewScan,
    codes: dict[str, np.ndarray],
    res: MatchResult,
    prob: np.ndarray | None,
    low: np.ndarray,
    max_voxels: int,
) -> dict[str, Any]:
    emb = scan.emb
    coarse = torch.as_tensor(np.asarray(emb.coarse_affine, np.float64))
    fine = torch.as_tensor(np.asarray(emb.fine_affine, np.float64))
    radius = 1.5 * float(geometry.spacing(emb.coarse_affine).max())  # match_points' default
    half = np.ceil(radius / geometry.spacing(fine.numpy())).astype(int)
    fine_shape = codes["fine"].shape[:3]
    return {
        **_scan_entry(scan, codes, max_voxels),
        "heat": nifti_gz(np.zeros(fine_shape, np.float32), fine.numpy()),
        "f2c": (torch.linalg.inv(coarse) @ fine).tolist(),
        "radius": radius,
        "half": half.tolist(),
        "matches": np.asarray(res.points_mm, np.float64).round(3).tolist(),
        "scores": [round(float(s), 4) for s in res.scores],
        "probs": None if prob is None else [round(float(p), 3) for p in prob],
        "low": [bool(v) for v in low],
    }


def _check_inputs(
    out: Path,
    pts: np.ndarray,
    names: Sequence[str],
    targets: Sequence[ViewScan],
    matches: Sequence[MatchResult],
    probabilities: Sequence[np.ndarray] | None,
) -> None:
    if out.suffix.lower() not in (".html", ".htm"):
        raise AnatomapError(f"{out}: the viewer is an HTML page; give a name ending in .html")
    if len(pts) == 0 or not np.isfinite(pts).all():
        raise AnatomapError("viewer: no points, or points that are not finite numbers")
    if len(names) != len(pts):
        raise AnatomapError(f"viewer: {len(names)} names for {len(pts)} points")
    if not targets or len(matches) != len(targets):
        raise AnatomapError(f"viewer: {len(matches)} match results for {len(targets)} targets")
    for scan, res in zip(targets, matches, strict=True):
        if np.shape(res.points_mm) != (len(pts), 3) or np.shape(res.scores) != (len(pts),):
            raise AnatomapError(f"{scan.name}: match results are not one per template point")
    if probabilities is not None and [np.shape(p) for p in probabilities] != [(len(pts),)] * len(
        targets
    ):
        raise AnatomapError("viewer: probabilities must be one per point and target")


def _check_size(scans: Sequence[ViewScan], components: Sequence[int]) -> None:
    """One error line, before any work, when the page's embeddings would be too big."""
    ks = _check_components(components)
    size = 0
    for scan in scans:
        for level, k in zip(LEVELS, ks, strict=True):
            fmap = getattr(scan.emb, level)
            size += math.prod(fmap.shape[1:]) * min(k, int(fmap.shape[0]))
    size = 4 * size // 3  # base64
    if size > MAX_PAGE_BYTES:
        raise AnatomapError(
            f"viewer: the page would carry {size / 2**20:.1f} MB of embeddings (limit "
            f"{MAX_PAGE_BYTES / 2**20:.1f} MB): keep fewer components or crop the scans"
        )


def write_view(
    out: str | Path,
    template: ViewScan,
    targets: Sequence[ViewScan],
    points_mm: np.ndarray,
    names: Sequence[str],
    matches: Sequence[MatchResult],
    *,
    probabilities: Sequence[np.ndarray] | None = None,
    low: Sequence[np.ndarray] | None = None,
    low_score: float = DEFAULT_LOW_SCORE,
    calibration: dict[str, Any] | None = None,
    components: Sequence[int] = DEFAULT_COMPONENTS,
    max_display_voxels: int = MAX_DISPLAY_VOXELS,
    title: str | None = None,
) -> Path:
    """Write the viewer page ``out`` (.html): ``template`` and ``targets`` (:class:`ViewScan`),
    the template points (``[N, 3]`` world RAS mm, ``names``) and one full-precision
    :class:`~anatomap.infer.match.MatchResult` per target. Markers are coloured by
    ``probabilities`` (one ``[N]`` array per target) when given, else by score; ``low``
    flags matches (default: P < 0.5, or score < ``low_score``). ``calibration`` (a shipped
    model's) turns the page's own scores into probabilities. Returns ``out``."""
    from anatomap.io.atomic import atomic_write_text

    out = Path(out)
    pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
    _check_inputs(out, pts, names, targets, matches, probabilities)
    _check_size([template, *targets], components)
    red = reduce_embeddings([template.emb, *(t.emb for t in targets)], components)
    if low is None:
        low = [
            (np.asarray(p) < 0.5) if probabilities is not None else (r.scores < low_score)
            for p, r in zip(probabilities or [None] * len(matches), matches, strict=True)
        ]
    data = {
        "template": _scan_entry(template, red.codes[0], max_display_voxels),
        "targets": [
            _target_entry(
                scan,
                red.codes[i + 1],
                res,
                None if probabilities is None else probabilities[i],
                np.asarray(low[i], bool),
                max_display_voxels,
            )
            for i, (scan, res) in enumerate(zip(targets, matches, strict=True))
        ],
        "points": {"names": [str(n) for n in names], "mm": pts.round(3).tolist()},
        "scale": {lv: [float(s) for s in red.scale[lv]] for lv in LEVELS},
        "offset": {lv: [float(s) for s in red.offset[lv]] for lv in LEVELS},
        "colour_by": "p_within_5mm" if probabilities is not None else "score",
        "calibration": None
        if not calibration
        else {"x": list(calibration["x"]), "y": list(calibration["y"])},
        "candidates": CANDIDATES,
        "low_score": float(low_score),
    }
    title = title or f"anatomap view: {template.name} -> {', '.join(t.name for t in targets)}"
    return atomic_write_text(out, render_page(title, data), what="viewer page")


def _from_rows(
    found: Any,
) -> tuple[list[str], np.ndarray, list[MatchResult], list[np.ndarray] | None, list[np.ndarray]]:
    """Names, template points, results, probabilities and flags per target from a
    :class:`~anatomap.infer.points.Matches` or from ``anatomap match`` rows (dicts)."""
    if hasattr(found, "points_mm") and hasattr(found, "template_mm"):
        results = [
            MatchResult(np.asarray(p), np.asarray(s), np.full(len(s), np.nan))
            for p, s in zip(found.points_mm, found.scores, strict=True)
        ]
        prob = None if found.p_within_5mm is None else [np.asarray(p) for p in found.p_within_5mm]
        flags = [np.asarray(f, bool) for f in found.low_confidence]
        return [str(n) for n in found.names], np.asarray(found.template_mm), results, prob, flags
    rows = list(found)
    if not rows:
        raise AnatomapError("viewer: no matches to show")
    groups = [
        [r for r in rows if r["target"] == t] for t in dict.fromkeys(r["target"] for r in rows)
    ]
    first = groups[0]
    template = np.array([[r["template_x"], r["template_y"], r["template_z"]] for r in first])
    results = [
        MatchResult(
            np.array([[r["x"], r["y"], r["z"]] for r in g], np.float64),
            np.array([r["score"] for r in g], np.float64),
            np.full(len(g), np.nan),
        )
        for g in groups
    ]
    has_p = all("p_within_5mm" in r for r in rows)
    prob = [np.array([r["p_within_5mm"] for r in g]) for g in groups] if has_p else None
    flags = [np.array([bool(r["low_confidence"]) for r in g]) for g in groups]
    return [str(r["name"]) for r in first], template, results, prob, flags


def view_matches(
    out: str | Path,
    template: ViewScan,
    targets: Sequence[ViewScan],
    found: Any,
    *,
    calibration: dict[str, Any] | None = None,
    **page: Any,
) -> Path:
    """The page for matches already made (``anatomap match --view``): ``found`` is the
    :class:`~anatomap.infer.points.Matches` of ``anatomap.match``, or its rows (dicts with
    ``target, name, template_x/y/z, x, y, z, score, low_confidence`` and optionally
    ``p_within_5mm``, targets in the order of ``targets``); no embedding is recomputed."""
    names, pts, results, prob, flags = _from_rows(found)
    if len(results) != len(targets):
        raise AnatomapError(f"viewer: matches for {len(results)} targets, {len(targets)} given")
    return write_view(
        out,
        template,
        targets,
        pts,
        names,
        results,
        probabilities=prob,
        low=flags,
        calibration=calibration,
        **page,
    )


def build_view(
    model: DenseModel,
    template: str | Path,
    targets: Sequence[str | Path],
    points: str | Path | np.ndarray,
    out: str | Path,
    *,
    voxel: bool = False,
    coords: str = "RAS",
    names: Sequence[str] | None = None,
    low_score: float = DEFAULT_LOW_SCORE,
    embedding: dict[str, Any] | None = None,
    **page: Any,
) -> Path:
    """Embed (or load) template and targets, match ``points`` (a CSV, a Slicer ``.mrk.json``
    / ``.fcsv`` or an ``[N, 3]`` array, as :func:`anatomap.api.match` takes them; matched on
    the CPU), write the page ``out``. ``embedding``: options of
    :func:`~anatomap.infer.embed.load_or_embed` (window, device, ...); ``page``:
    :func:`write_view`'s (``components``, ...)."""
    from anatomap.infer.calibration import probability
    from anatomap.infer.points import grid_affine, read_points, to_ras

    out, opts = Path(out), dict(embedding or {})
    if out.suffix.lower() not in (".html", ".htm"):  # before any embedding
        raise AnatomapError(f"{out}: the viewer is an HTML page; give a name ending in .html")
    if isinstance(points, str | Path):  # before any embedding too
        names, coords_in = read_points(points, voxel=voxel, coords=coords)
    else:
        coords_in = np.asarray(points, np.float64).reshape(-1, 3)
        coords_in = coords_in if voxel else to_ras(coords_in, coords)
        names = list(names) if names is not None else [f"p{i}" for i in range(len(coords_in))]
    t_emb = load_or_embed(model, template, **opts)
    if voxel:
        affine = grid_affine(template, t_emb)
        if affine is None:
            raise AnatomapError(f"{template}: cannot convert voxel indices (no image affine)")
        coords_in = geometry.voxel_to_world(affine, coords_in)
    embs = [load_or_embed(model, t, **opts) for t in targets]
    results = [match_points(t_emb, coords_in, e) for e in embs]
    calibration = model.meta.get("calibration")
    prob = [probability(calibration, r.scores) for r in results] if calibration else None
    return write_view(
        out,
        ViewScan.from_path(template, t_emb),
        [ViewScan.from_path(t, e) for t, e in zip(targets, embs, strict=True)],
        coords_in,
        names,
        results,
        probabilities=prob,
        low_score=low_score,
        calibration=calibration,
        **page,
    )


def agreement(
    template: DenseEmbedding,
    target: DenseEmbedding,
    points_mm: np.ndarray,
    components: Sequence[int] = DEFAULT_COMPONENTS,
) -> dict[str, float]:
    """How faithful the page's matcher is: ``match_points`` on the reduced embeddings of
    ``template`` and ``target`` (as a page of these two carries them) against the
    full-precision match of ``points_mm``. Returns the shares of points matched to the same
    fine voxel and to within one fine voxel (every index within 1), and the largest distance
    between the two matches (mm)."""
    pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
    red = reduce_embeddings([template, target], components)
    full = match_points(template, pts, target)
    small = match_points(red.embedding(0, template), pts, red.embedding(1, target))
    aff = np.asarray(target.fine_affine, np.float64)
    step = np.abs(
        np.round(geometry.world_to_voxel(aff, full.points_mm))
        - np.round(geometry.world_to_voxel(aff, small.points_mm))
    ).max(1)
    return {
        "points": float(len(pts)),
        "same_voxel": float((step == 0).mean()),
        "within_one_voxel": float((step <= 1).mean()),
        "max_mm": float(np.linalg.norm(full.points_mm - small.points_mm, axis=1).max()),
    }
