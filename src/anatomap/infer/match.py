"""Find a template point in other scans by coarse-to-fine embedding matching (SAM, Yan et al.
2022, section III-C): the best coarse-similarity voxels of the target (top 3), each refined by
the argmax of coarse + fine similarity among the fine voxels near it; the best one wins.

Memory and time are bounded by a chunk of points, whatever their number: the coarse
similarities of ``chunk_size`` points to every coarse voxel (one matrix product) give each
point's candidates; the refinement then scores only the fine voxels within the refinement
radius of a candidate. Its fine term is a sampled dense-dense product
(``torch.sparse.sampled_addmm``: one dot product per scored voxel, nothing ``[voxels, D]``
materialised); its coarse term is the trilinear interpolation, at the fine voxel, of the
point's coarse similarities, divided by the norm of the interpolated coarse vector (per target,
from 8x8 Gram matrices of the coarse cells). That equals the cosine similarity with the coarse
map re-sampled on the fine grid, as before, without building that map.

Maps may be float16 (as :func:`~anatomap.infer.embed.embed_array` makes them): template vectors
are read from each point's 8 corner voxels and upcast there; the target's state holds its maps
as float32, upcast one slab at a time (torch's sampled product has no float16 CPU kernel;
gathering float16 rows measured 4-7x slower). ``device``: the CPU (the refinement on
``MATCH_THREADS`` threads) or a GPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anatomap import geometry
from anatomap.errors import AnatomapError
from anatomap.infer.device import at_most_threads, float32_rows, resolve_device, small_op_threads
from anatomap.infer.embed import DenseEmbedding

DEFAULT_LOW_SCORE = 0.5
DEFAULT_CHUNK_SIZE = 1024
MIN_BLOCK_BYTES = 32 * 2**20  # refinement blocks may always use this much (see fine_block)
SCORED_BYTES = 192  # temporaries per scored fine voxel in the refinement, at most
_EPS = 1e-12  # F.normalize's floor on a norm
UPCAST_BYTES = 64 * 2**20  # float32 rows made from a float16 map at once
MATCH_THREADS: int | None = None  # CPU threads of the refinement; None: half (small_op_threads)
_CORNERS = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]


@dataclass
class MatchResult:
    """Matched world points ``[N, 3]`` (mm) and their similarity scores (mean of coarse and
    fine cosine similarity at the match, in [-1, 1])."""

    points_mm: np.ndarray
    scores: np.ndarray
    coarse_scores: np.ndarray


def _check_inside(template: DenseEmbedding, pts: np.ndarray) -> None:
    """Raise naming the points that lie outside the template's image."""
    if template.image_affine is None or not template.image_shape:
        return
    ijk = geometry.world_to_voxel(template.image_affine, pts)
    outside = ~geometry.inside(ijk, template.image_shape, margin=-0.5)
    if outside.any():
        bad = ", ".join(str(np.round(p, 1).tolist()) for p in pts[outside][:3])
        raise AnatomapError(
            f"{template.source or 'template'}: {int(outside.sum())} point(s) outside the "
            f"template image (world mm, RAS): {bad}"
        )


def _sample(fmap: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Unit-length trilinear samples ``[N, D]`` (float32) of ``fmap [D, *s]`` (any float dtype)
    at voxel indices ``ijk [N, 3]`` inside it, as :func:`anatomap.geometry.sample_map` computes
    them, reading (and upcasting) only each point's 8 corner voxels."""
    rows, idx, wts = fmap.movedim(0, -1), [], []
    for a, n in enumerate(fmap.shape[1:]):
        p, w_lo, w_hi = _lerp(ijk[:, a].to(fmap.device), n)  # p: the lower corner + 1
        idx.append(((p - 1).clamp(0, n - 1), p.clamp(max=n - 1)))
        wts.append((w_lo.masked_fill(p < 1, 0.0), w_hi.masked_fill(p > n - 1, 0.0)))
    out = fmap.new_zeros(len(ijk), fmap.shape[0], dtype=torch.float32)
    for a, b, c in _CORNERS:
        w = wts[0][a] * wts[1][b] * wts[2][c]
        out += w[:, None] * rows[idx[0][a], idx[1][b], idx[2][c]].float()
    return torch.nn.functional.normalize(out, dim=-1)


def _sample_template(
    template: DenseEmbedding, pts: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    maps, affines = (template.coarse, template.fine), (template.coarse_affine, template.fine_affine)
    out = []
    for fmap, aff in zip(maps, affines, strict=True):
        ijk = geometry.world_to_voxel(torch.as_tensor(aff), torch.as_tensor(pts))
        ijk = torch.stack([ijk[:, k].clamp(0, fmap.shape[k + 1] - 1) for k in range(3)], -1)
        out.append(_sample(fmap, ijk))
    return out[0], out[1]


def template_vectors(
    template: DenseEmbedding, points_mm: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse and fine embeddings ``[N, D]`` at world points of the template.

    Points outside the template's image raise an error naming them.
    """
    pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
    _check_inside(template, pts)
    return _sample_template(template, pts)


# -- the target's state -----------------------------------------------------------------------


@dataclass
class _Target:
    """What matching needs of a target, computed once per embedding (and kept on it)."""

    source: tuple[object, ...]  # the embedding's maps and affines (to notice a replaced one)
    device: torch.device
    rows: torch.Tensor  # [Mf, D] float32: one row per fine voxel
    coarse: torch.Tensor  # [D, Mc]
    grams: torch.Tensor  # [cells, 64]: 8 x 8 Gram matrix of each padded coarse cell's corners
    shape_c: tuple[int, int, int]
    shape_f: tuple[int, int, int]
    coarse_aff: torch.Tensor  # coarse voxel -> world (float64)
    fine_aff: torch.Tensor  # fine voxel -> world (float64)
    fine_inv: torch.Tensor  # world -> fine voxel
    fine_to_coarse: torch.Tensor  # fine voxel -> continuous coarse voxel (float64)
    norm: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [Mf], _norm_map
    axes: list[tuple[torch.Tensor, ...]] | None = None  # _axis_tables


def _padded(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The coarse grid padded with one zero voxel below and two above on every axis."""
    return tuple(n + 3 for n in shape)


def _cell_grams(coarse: torch.Tensor) -> torch.Tensor:
    """Gram matrices ``[cells, 64]`` of the 8 corners of every cell of the zero-padded coarse
    grid (:func:`_padded`; a cell is named by the flat index of its lower corner)."""
    d = coarse.shape[0]
    pad = torch.nn.functional.pad(coarse, (1, 3, 1, 3, 1, 3))  # + the last cells' corners
    n = _padded(tuple(coarse.shape[1:]))
    grams = torch.empty(n[0], n[1] * n[2], 8, 8, device=coarse.device)
    for x in range(n[0]):  # one slab of cells at a time
        corners = torch.stack(
            [pad[:, x + a, b : b + n[1], c : c + n[2]].reshape(d, -1) for a, b, c in _CORNERS],
            -1,
        )  # [D, cells, 8]
        grams[x] = torch.einsum("dca,dcb->cab", corners, corners)
    return grams.reshape(-1, 64)


Weights = list[tuple[torch.Tensor, torch.Tensor]]  # per axis: weights of corners lo, lo + 1


def _lerp(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation at continuous indices ``x`` (float64) of a coarse axis of
    ``size`` voxels, as ``grid_sample(align_corners=True, padding_mode="zeros")`` computes it
    (float32 normalise / un-normalise round trip). Returns the lower corner in the padded
    grid (clamped into it) and the weights of the corners ``lo`` and ``lo + 1`` (both 0
    beyond the padding, where no corner is inside the map)."""
    ix = (2.0 * x.float() / max(size - 1, 1) - 1.0 + 1) / 2 * (size - 1)
    lo = ix.floor()
    p = lo.long() + 1
    beyond = (p < 0) | (p > size)
    w_lo = ((lo + 1) - ix).masked_fill(beyond, 0.0)
    return p.clamp(0, size), w_lo, (ix - lo).masked_fill(beyond, 0.0)


def _axis_tables(t: _Target) -> list[tuple[torch.Tensor, ...]] | None:
    """:func:`_lerp` of every fine index along each axis, when the fine-to-coarse voxel map
    is diagonal (the two maps of one image are): trilinear weights then factor by axis."""
    lin, f2c = t.fine_to_coarse[:3, :3], t.fine_to_coarse
    if not bool(((lin - torch.diag(torch.diagonal(lin))).abs() <= 1e-12 * lin.abs().max()).all()):
        return None
    return [
        _lerp(
            f2c[a, a] * torch.arange(t.shape_f[a], dtype=f2c.dtype, device=t.device) + f2c[a, 3], n
        )
        for a, n in enumerate(t.shape_c)
    ]


def _unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel indices ``[E, 3]`` of flat indices (``torch.unravel_index`` imports sympy)."""
    return torch.stack(
        [flat // (shape[1] * shape[2]), flat // shape[2] % shape[1], flat % shape[2]], -1
    )


def _cells(t: _Target, ijk: list[torch.Tensor]) -> tuple[torch.Tensor, Weights]:
    """Trilinear sampling of the coarse map at fine voxels (indices per axis ``ijk[a] [...]``,
    inside the fine map) as :func:`anatomap.geometry.sample_map` does it. Returns each
    voxel's cell (the flat index of its lower corner in the padded grid) ``[...]`` and the
    weights of the corners along each axis."""
    if t.axes is not None:  # look-ups in the axis tables
        axes = [[table[i] for table in axis] for axis, i in zip(t.axes, ijk, strict=True)]
    else:
        x = geometry.apply_affine(t.fine_to_coarse, torch.stack(ijk, -1).to(torch.float64))
        axes = [list(_lerp(x[..., a], n)) for a, n in enumerate(t.shape_c)]
    p, w = [axis[0] for axis in axes], [(axis[1], axis[2]) for axis in axes]
    n = _padded(t.shape_c)
    return (p[0] * n[1] + p[1]) * n[2] + p[2], w


def _corner_weights(w: Weights) -> torch.Tensor:
    """The 8 corner weights ``[..., 8]`` (``_CORNERS`` order) of per-axis weights."""
    w0, w1, w2 = (torch.stack(ab, -1) for ab in w)
    return ((w2[..., None, None, :] * w1[..., None, :, None]) * w0[..., :, None, None]).flatten(-3)


def _interpolate(t: _Target, grid: torch.Tensor, cell: torch.Tensor, w: Weights) -> torch.Tensor:
    """Trilinear interpolation of values on the padded coarse grid ``grid [B, cells]`` at
    ``cell [B, E]`` with weights ``w``, one axis at a time (corners read through shifted
    views: no ``[B, E, 8]`` index)."""
    n = _padded(t.shape_c)

    def corner(a: int, b: int, c: int) -> torch.Tensor:
        return grid[:, (a * n[1] + b) * n[2] + c :].gather(1, cell)

    def along2(a: int, b: int) -> torch.Tensor:
        return w[2][0] * corner(a, b, 0) + w[2][1] * corner(a, b, 1)

    def along1(a: int) -> torch.Tensor:
        return w[1][0] * along2(a, 0) + w[1][1] * along2(a, 1)

    return w[0][0] * along1(0) + w[0][1] * along1(1)


def _norms(t: _Target, cell: torch.Tensor, w: Weights) -> torch.Tensor:
    """``|sum_i w_i c_i|`` of the interpolated coarse vectors: ``sqrt(w^T G w)``."""
    w8 = _corner_weights(w)
    ww = (w8[:, :, None] * w8[:, None, :]).reshape(-1, 64)
    return (t.grams[cell] * ww).sum(-1).clamp_min(0).sqrt()


def _norm_map(t: _Target, block: int = 1 << 16) -> torch.Tensor:
    """:func:`_norms` at every fine voxel ``[Mf]``. With axis tables the Gram terms are
    summed one axis at a time (about 15 multiply-adds per fine voxel)."""
    if t.axes is None:
        m_f = math.prod(t.shape_f)
        norm = torch.empty(m_f, device=t.device)
        for s in range(0, m_f, block):
            ijk = _unravel(torch.arange(s, min(s + block, m_f), device=t.device), t.shape_f)
            norm[s : s + len(ijk)] = _norms(t, *_cells(t, list(ijk.unbind(-1))))
        return norm
    (p0, *w0), (p1, *w1), (p2, *w2) = t.axes
    w0, w1, w2 = (torch.stack(w, -1) for w in (w0, w1, w2))
    g = t.grams.view(*_padded(t.shape_c), 2, 2, 2, 2, 2, 2)  # cell, corner a, corner b
    g = torch.einsum("xyzabcdef,zc,zf->xyzabde", g[:, :, p2], w2, w2)
    g = torch.einsum("xyzabde,yb,ye->xyzad", g[:, p1], w1, w1)
    sq = torch.einsum("xyzad,xa,xd->xyz", g[p0], w0, w0)
    return sq.reshape(-1).clamp_min(0).sqrt()


def prepare_target(emb: DenseEmbedding, device: str | torch.device = "cpu") -> _Target:
    """The per-target part of :func:`match_points`, cached on the embedding (for one device
    at a time): the fine map as float32 rows (:func:`~anatomap.infer.device.float32_rows`),
    the Gram matrices of the coarse cells (64 floats per coarse voxel) and the norm of the
    interpolated coarse map at every fine voxel (one float per fine voxel)."""
    dev = resolve_device(device)
    if dev.type == "mps":  # the geometry is float64 arithmetic, which MPS lacks: the CPU
        dev = torch.device("cpu")
    source = (emb.coarse, emb.fine, emb.coarse_affine, emb.fine_affine)
    cached = getattr(emb, "_match_target", None)
    if (
        cached is not None
        and cached.device == dev
        and all(a is b for a, b in zip(cached.source, source, strict=True))
    ):
        return cached
    emb._match_target = None  # type: ignore[attr-defined]  # free the old state first
    fine_aff = torch.as_tensor(emb.fine_affine, dtype=torch.float64)
    coarse_aff = torch.as_tensor(emb.coarse_affine, dtype=torch.float64)
    coarse = emb.coarse.to(dev, torch.float32)
    state = _Target(
        source=source,
        device=dev,
        rows=float32_rows(emb.fine, dev, UPCAST_BYTES),
        coarse=coarse.reshape(coarse.shape[0], -1),
        grams=_cell_grams(coarse),
        shape_c=tuple(emb.coarse.shape[1:]),  # type: ignore[arg-type]
        shape_f=tuple(emb.fine.shape[1:]),  # type: ignore[arg-type]
        coarse_aff=coarse_aff.to(dev),
        fine_aff=fine_aff.to(dev),
        fine_inv=torch.linalg.inv(fine_aff).to(dev),  # inverted on the CPU on every device
        fine_to_coarse=(torch.linalg.inv(coarse_aff) @ fine_aff).to(dev),
    )
    state.axes = _axis_tables(state)
    state.norm = _norm_map(state)
    emb._match_target = state  # type: ignore[attr-defined]
    return state


# -- scoring fine voxels ----------------------------------------------------------------------


def _fine_dots(rows: torch.Tensor, q: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``q[b] . rows[flat[b, e]]`` for every ``b, e``: ``[B, E]`` dot products, one per scored
    voxel. On the CPU a sampled dense-dense product (no ``[B, E, D]`` gather); on a GPU a
    gather and a batched product (:func:`_gathered_dots`)."""
    if rows.device.type != "cpu":
        return _gathered_dots(rows, q, flat)
    b, e = flat.shape
    split = -(-e // len(rows))  # sampled_addmm takes at most one entry per column and row
    if split > 1:
        flat = torch.nn.functional.pad(flat, (0, split * -(-e // split) - e))
        q = q.repeat_interleave(split, 0)
    crow = torch.arange(0, flat.numel() + 1, flat.numel() // (b * split))
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        args = (crow, flat.reshape(-1), torch.zeros(flat.numel()), (b * split, len(rows)))
        pattern = torch.sparse_csr_tensor(*args, check_invariants=False)
    out = torch.sparse.sampled_addmm(pattern, q.contiguous(), rows.T, beta=0.0)
    return out.values().view(b, -1)[:, :e]


def _gathered_dots(rows: torch.Tensor, q: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """:func:`_fine_dots` by gathering the rows ``[B, E, D]`` (GPUs: memory is fast there)."""
    return torch.bmm(rows[flat], q[:, :, None]).squeeze(-1)


def _score(
    t: _Target, q_f: torch.Tensor, sim_pad: torch.Tensor, ijk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse + fine similarity ``[B, E]`` of points ``b`` at fine voxels ``ijk [3, B, E]``,
    from their fine vectors ``q_f [B, D]`` and their coarse similarities to the zero-padded
    coarse grid ``sim_pad [B, cells]``; and whether each voxel is inside the fine map."""
    n = t.shape_f
    valid = ((ijk >= 0) & (ijk < torch.as_tensor(n, device=t.device)[:, None, None])).all(0)
    c = [ijk[a].clamp(0, n[a] - 1) for a in range(3)]
    flat = (c[0] * n[1] + c[1]) * n[2] + c[2]
    fine = _fine_dots(t.rows, q_f, flat)
    cell, w = _cells(t, c)
    num = _interpolate(t, sim_pad, cell, w)
    return fine + num / t.norm[flat].clamp_min(_EPS), valid


# -- matching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reach:
    """A call's refinement neighbourhood: the radius (mm), the old matcher's box of fine-voxel
    offsets around a candidate, and the fine grid's least and greatest stretch (mm/voxel)."""

    radius: float
    box: torch.Tensor
    stretch: tuple[float, float]


def _reach(t: _Target, radius: float) -> _Reach:
    aff = t.fine_aff.cpu().numpy()
    half = np.ceil(radius / geometry.spacing(aff)).astype(int)
    box = torch.stack(
        torch.meshgrid(*[torch.arange(-h, h + 1) for h in half], indexing="ij"), -1
    ).reshape(-1, 3)
    box = box.to(t.device)
    sv = np.linalg.svd(aff[:3, :3], compute_uv=False)
    return _Reach(radius, box, (float(sv.min()), float(sv.max())))


def _offsets(reach: _Reach, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box's offsets ``[K, 3]`` (in its order) that may lie within the radius of a
    candidate centre whose fine index was rounded off by ``residuals [C, 3]``, and the
    positions among them that need the exact distance test (the others surely pass it)."""
    box, radius = reach.box, reach.radius
    lo, hi = residuals.amin(0), residuals.amax(0)
    near = ((lo - box).clamp_min(0) + (box - hi).clamp_min(0)).norm(dim=-1)
    far = torch.maximum((box - lo).abs(), (box - hi).abs()).norm(dim=-1)
    tol = 1e-9 * (1 + radius)
    keep = reach.stretch[0] * near <= radius + tol
    return box[keep], torch.nonzero(reach.stretch[1] * far[keep] > radius - tol).flatten()


def _refine(
    t: _Target, q_f: torch.Tensor, sim_pad: torch.Tensor, top: torch.Tensor, reach: _Reach
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best coarse + fine voxel within reach of each of the ``top [B, k]`` coarse
    candidates of ``B`` points; the best candidate wins (the first on ties, as ``argmax``).
    Returns the winners' fine voxel indices ``[B, 3]`` and combined similarities ``[B]``."""
    b, k = top.shape
    ijk_c = _unravel(top.reshape(-1), t.shape_c)
    centre_mm = geometry.voxel_to_world(t.coarse_aff, ijk_c.to(torch.float64))
    cont = geometry.apply_affine(t.fine_inv, centre_mm)  # = world_to_voxel(fine_aff, .)
    centre_ijk = cont.round().long()
    offsets, check = _offsets(reach, cont - centre_ijk)
    ijk = centre_ijk.T[:, :, None] + offsets.T[:, None, :]  # [3, B * k, K]
    combined, valid = _score(t, q_f, sim_pad, ijk.reshape(3, b, -1))
    ok = valid.view(b * k, -1)
    if len(check):  # the exact distance test, as before, where it can fail
        near = ijk[:, :, check].permute(1, 2, 0).to(torch.float64)
        world = geometry.voxel_to_world(t.fine_aff, near)
        ok[:, check] &= (world - centre_mm[:, None, :]).norm(dim=-1) <= reach.radius
    combined = combined.view(b * k, -1).masked_fill(~ok, float("-inf"))
    best_val, best = combined.max(1)  # per (point, candidate)
    pick = best_val.view(b, k).argmax(1) + torch.arange(b, device=t.device) * k
    win, score = ijk[:, pick, best[pick]].T, best_val[pick]
    lost = torch.isneginf(score)  # no voxel inside the map and the radius: as before
    if lost.any():
        corner = centre_ijk[pick[lost]] + reach.box[0]
        win[lost] = torch.minimum(
            corner.clamp_min(0), torch.as_tensor(t.shape_f, device=t.device) - 1
        )
    return win, score


def _subvoxel(
    t: _Target, q_f: torch.Tensor, sim_pad: torch.Tensor, ijk: torch.Tensor, peak: torch.Tensor
) -> torch.Tensor:
    """Continuous fine indices ``[B, 3]`` of the combined-similarity peak: a parabola through
    the winner and its two neighbours along each axis (no shift along an axis where a
    neighbour is outside the map or the winner is not a strict maximum)."""
    eye = torch.eye(3, dtype=torch.long, device=t.device)
    steps = torch.cat([eye, -eye])
    around, valid = _score(t, q_f, sim_pad, (ijk[:, None, :] + steps[None]).permute(2, 0, 1))
    plus, minus = around[:, :3].double(), around[:, 3:].double()
    curve = plus + minus - 2 * peak.double()[:, None]
    ok = valid[:, :3] & valid[:, 3:] & (curve < 0)
    shift = 0.5 * (minus - plus) / torch.where(ok, curve, -torch.ones_like(curve))
    return ijk.double() + torch.where(ok, shift, 0.0).clamp(-0.5, 0.5)


def fine_block(chunk_size: int, n_coarse: int, n_scored: int) -> int:
    """Points refined at once: their temporaries (about ``SCORED_BYTES`` per scored voxel,
    ``n_scored`` voxels per point) take no more memory than a chunk's coarse similarities
    (``chunk_size x n_coarse`` float32) or ``MIN_BLOCK_BYTES`` (so that small maps do not
    refine one point at a time); one point at least."""
    budget = max(4 * chunk_size * n_coarse, MIN_BLOCK_BYTES)
    return max(1, budget // (SCORED_BYTES * max(1, n_scored)))


@torch.no_grad()
def match_points(
    template: DenseEmbedding,
    points_mm: np.ndarray,
    target: DenseEmbedding,
    refine_radius_mm: float | None = None,
    candidates: int = 3,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    subvoxel: bool = False,
    device: str | torch.device = "cpu",
) -> MatchResult:
    """Coarse argmax, then coarse + fine argmax within ``refine_radius_mm`` of it (default:
    one and a half coarse voxels). The ``candidates`` best coarse voxels are each refined and
    the best combined score wins, which guards against a single wrong coarse peak.

    Points go ``chunk_size`` at a time: the largest intermediate holds about ``chunk_size x
    coarse voxels`` floats, whatever the number of points. ``subvoxel=True`` moves each
    match to the parabolic peak of the combined similarity between fine voxels, so matches do
    not snap to the fine grid (the score stays the voxel's; measured: lower error in every
    transfer condition, docs/benchmarks.md "match_outliers"). Off here (the voxel centre, as
    the evaluation's matchers use); ``anatomap.match`` and ``anatomap match`` turn it on.
    ``device`` (:func:`~anatomap.infer.device.resolve_device`) holds the target's state and
    does the work (``mps`` falls back to the CPU: the geometry is float64); results come
    back as NumPy arrays."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: must be at least 1")
    pts = np.asarray(points_mm, np.float64).reshape(-1, 3)
    _check_inside(template, pts)
    t = prepare_target(target, device)
    m_c = t.coarse.shape[1]
    k = min(candidates, m_c)
    if refine_radius_mm is None:
        refine_radius_mm = 1.5 * float(geometry.spacing(target.coarse_affine).max())
    reach = _reach(t, refine_radius_mm)
    step = fine_block(chunk_size, m_c, k * len(reach.box))
    out, scores, coarse_scores = np.empty((len(pts), 3)), np.empty(len(pts)), np.empty(len(pts))
    for s in range(0, len(pts), chunk_size):
        q_c, q_f = (q.to(t.device) for q in _sample_template(template, pts[s : s + chunk_size]))
        sim = q_c @ t.coarse  # [chunk, Mc]
        top_val, top = sim.topk(k, dim=1)
        coarse_scores[s : s + len(q_c)] = top_val[:, 0].double().cpu().numpy()
        with at_most_threads(small_op_threads(MATCH_THREADS)):  # refinement: small operations
            for r in range(0, len(q_c), step):
                sim_pad = torch.nn.functional.pad(
                    sim[r : r + step].view(-1, *t.shape_c), (1, 2, 1, 2, 1, 2)
                ).flatten(1)
                q = q_f[r : r + step]
                ijk, best = _refine(t, q, sim_pad, top[r : r + step], reach)
                at = ijk.to(torch.float64)
                if subvoxel:
                    at = _subvoxel(t, q, sim_pad, ijk, best)
                at = geometry.voxel_to_world(t.fine_aff, at).cpu().numpy()
                out[s + r : s + r + len(ijk)] = at
                scores[s + r : s + r + len(ijk)] = (best / 2.0).double().cpu().numpy()
    return MatchResult(out, scores, coarse_scores)


def read_points(
    path: str | Path, voxel: bool = False, coords: str = "RAS"
) -> tuple[list[str], np.ndarray]:
    """Names and points ``[N, 3]`` (RAS) of a points file: CSV ``x,y,z`` world mm in
    ``coords`` (RAS or LPS) or ``i,j,k`` with ``voxel=True``, 3D Slicer ``.mrk.json`` /
    ``.fcsv``; :func:`anatomap.infer.points.read_points` (one error line naming the file)."""
    from anatomap.infer.points import read_points as _read

    return _read(path, coords=coords, voxel=voxel)
