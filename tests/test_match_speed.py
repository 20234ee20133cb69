"""Chunked matching finds what the dense matcher found (issue 18).

``_reference_match_points`` is ``match_points`` as it was before the rewrite: one
``[points, coarse voxels]`` similarity matrix, then every candidate's whole neighbourhood
gathered as ``[points * candidates, box voxels, D]`` vectors from the fine map and from the
coarse map re-sampled on the fine grid. The new one must return the same points. Scores may
differ by float32 rounding only: both are sums of the same 128 (here 16) products taken in
another order (sampled dense-dense product instead of ``einsum``; the interpolated coarse
similarity as ``sum w_i (q . c_i) / |sum w_i c_i|`` instead of ``q . normalize(sum w_i c_i)``),
a few 1e-7 for unit vectors; 1e-5 is allowed. Where two voxels score within that of each other
either is a correct argmax, so a differing point must score within it of the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from anatomap import geometry
from anatomap.errors import AnatomapError
from anatomap.geometry import sample_map
from anatomap.infer.embed import DenseEmbedding
from anatomap.infer.match import (
    MIN_BLOCK_BYTES,
    SCORED_BYTES,
    MatchResult,
    _fine_dots,
    _padded,
    fine_block,
    match_points,
    prepare_target,
    template_vectors,
)

SCORE_TOL = 1e-5


# -- the implementation before issue 18 --------------------------------------------------------


def _reference_coarse_on_fine(emb: DenseEmbedding) -> torch.Tensor:
    shape_f = tuple(emb.fine.shape[1:])
    world = geometry.world_grid(torch.as_tensor(emb.fine_affine), shape_f).reshape(-1, 3)
    ijk = geometry.world_to_voxel(torch.as_tensor(emb.coarse_affine), world)
    return sample_map(emb.coarse, ijk).T.reshape(-1, *shape_f).contiguous()


def _reference_match_points(
    template: DenseEmbedding,
    points_mm: np.ndarray,
    target: DenseEmbedding,
    refine_radius_mm: float | None = None,
    candidates: int = 3,
) -> MatchResult:
    q_c, q_f = template_vectors(template, points_mm)
    n_pts = len(q_c)
    sim_c = q_c @ target.coarse.flatten(1)
    k_c = min(candidates, sim_c.shape[1])
    best = sim_c.topk(k_c, dim=1).indices.reshape(-1)
    q_c, q_f = q_c.repeat_interleave(k_c, 0), q_f.repeat_interleave(k_c, 0)
    shape_c = target.coarse.shape[1:]
    ijk_best = torch.stack(torch.unravel_index(best, shape_c), -1).to(torch.float64)
    fine_aff = torch.as_tensor(target.fine_affine)
    centre_mm = geometry.voxel_to_world(torch.as_tensor(target.coarse_affine), ijk_best)
    if refine_radius_mm is None:
        refine_radius_mm = 1.5 * float(geometry.spacing(target.coarse_affine).max())
    half = np.ceil(refine_radius_mm / geometry.spacing(target.fine_affine)).astype(int)
    offsets = torch.stack(
        torch.meshgrid(*[torch.arange(-h, h + 1) for h in half], indexing="ij"), -1
    ).reshape(-1, 3)
    shape_f = torch.as_tensor(target.fine.shape[1:])
    centre_ijk = geometry.world_to_voxel(fine_aff, centre_mm).round().long()
    ijk = centre_ijk[:, None, :] + offsets[None]
    valid = ((ijk >= 0) & (ijk < shape_f)).all(-1)
    ijk = torch.minimum(ijk.clamp_min(0), shape_f - 1)
    world = geometry.voxel_to_world(fine_aff, ijk.to(torch.float64))
    within = (world - centre_mm[:, None, :]).norm(dim=-1) <= refine_radius_mm
    flat = (ijk[..., 0] * shape_f[1] + ijk[..., 1]) * shape_f[2] + ijk[..., 2]
    fine_sim = torch.einsum("nkd,nd->nk", target.fine.flatten(1).T[flat], q_f)
    coarse_vecs = _reference_coarse_on_fine(target).flatten(1).T[flat]
    combined = fine_sim + torch.einsum("nkd,nd->nk", coarse_vecs, q_c)
    combined = combined.masked_fill(~(valid & within), float("-inf"))
    best_val, k = combined.max(1)
    pick = best_val.view(n_pts, k_c).argmax(1) + torch.arange(n_pts) * k_c
    out_pts = world[pick, k[pick]].numpy()
    scores = (best_val[pick] / 2.0).double().numpy()
    return MatchResult(out_pts, scores, sim_c.max(1).values.double().numpy())


# -- embeddings --------------------------------------------------------------------------------

SHAPE = (40, 44, 36)  # image voxels (2 mm): coarse 5 x 6 x 5 (16 mm), fine 20 x 22 x 18 (4 mm)


def _image_affine(origin: tuple[float, float, float] = (-40.0, -44.0, -36.0)) -> np.ndarray:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] = origin
    return a


def _unit(gen: torch.Generator, dim: int, shape: tuple[int, ...]) -> torch.Tensor:
    return F.normalize(torch.randn(dim, *shape, generator=gen), dim=0)


def _embedding(
    coarse: torch.Tensor, fine: torch.Tensor, image_affine: np.ndarray, **affines: np.ndarray
) -> DenseEmbedding:
    """Maps with their affines (default: strides 8 and 2 of ``image_affine``)."""
    return DenseEmbedding(
        coarse,
        fine,
        affines.get("coarse_affine", geometry.feature_affine(image_affine, 8)),
        affines.get("fine_affine", geometry.feature_affine(image_affine, 2)),
        image_shape=SHAPE,
        image_affine=image_affine,
    )


def _template(seed: int = 0, dim: int = 16) -> DenseEmbedding:
    g = torch.Generator().manual_seed(seed)
    cs = tuple(math.ceil(n / 8) for n in SHAPE)
    fs = tuple(math.ceil(n / 2) for n in SHAPE)
    return _embedding(_unit(g, dim, cs), _unit(g, dim, fs), _image_affine())


def _moved(
    template: DenseEmbedding, shift_mm: np.ndarray, noise: float, flip: bool = False, seed: int = 1
) -> DenseEmbedding:
    """The template's maps seen from another scan: the same content ``shift_mm`` further in
    the world, plus noise; ``flip`` stores axis 0 reversed (affines flipped to match)."""
    g = torch.Generator().manual_seed(seed)
    maps, affines = [], {}
    for name in ("coarse", "fine"):
        m = getattr(template, name)
        m = F.normalize(m + noise * torch.randn(m.shape, generator=g), dim=0)
        aff = getattr(template, f"{name}_affine").copy()
        aff[:3, 3] += shift_mm
        if flip:
            m = m.flip(1)
            reverse = np.diag([-1.0, 1.0, 1.0, 1.0])
            reverse[0, 3] = m.shape[1] - 1
            aff = aff @ reverse
        maps.append(m)
        affines[f"{name}_affine"] = aff
    image = template.image_affine.copy()
    image[:3, 3] += shift_mm
    return _embedding(maps[0], maps[1], image, **affines)


def _oblique(seed: int = 2, dim: int = 16) -> DenseEmbedding:
    """Random maps whose coarse grid is rotated against the fine one (no axis tables)."""
    g = torch.Generator().manual_seed(seed)

    def rotation(angle: float, axis: int) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        r = np.eye(4)
        i, j = [a for a in range(3) if a != axis]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    fine = rotation(0.3, 2) @ np.diag([4.0, 3.0, 5.0, 1.0])
    fine[:3, 3] = [-30.0, -40.0, -35.0]
    coarse = rotation(-0.2, 0) @ np.diag([14.0, 16.0, 12.0, 1.0])
    coarse[:3, 3] = [-38.0, -42.0, -30.0]
    return _embedding(
        _unit(g, dim, (6, 6, 6)),
        _unit(g, dim, (18, 24, 15)),
        _image_affine(),
        coarse_affine=coarse,
        fine_affine=fine,
    )


def _points(n: int, seed: int = 0, margin: float = 6.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ijk = rng.uniform(margin, np.asarray(SHAPE) - 1 - margin, size=(n, 3))
    return geometry.voxel_to_world(_image_affine(), ijk)


def _assert_same(new: MatchResult, ref: MatchResult) -> None:
    lost = np.isneginf(ref.scores)  # no fine voxel in reach (grids that barely overlap)
    np.testing.assert_array_equal(np.isneginf(new.scores), lost)
    new, ref = (
        MatchResult(r.points_mm, np.where(lost, 0, r.scores), r.coarse_scores) for r in (new, ref)
    )
    assert np.abs(new.scores - ref.scores).max() <= SCORE_TOL
    assert np.abs(new.coarse_scores - ref.coarse_scores).max() <= SCORE_TOL
    differ = np.abs(new.points_mm - ref.points_mm).max(1) > 1e-9
    # A different voxel only where it ties with the reference's (see the module docstring).
    assert np.all(np.abs(new.scores[differ] - ref.scores[differ]) <= SCORE_TOL)
    assert differ.sum() <= max(1, len(differ) // 100)


# -- tests -------------------------------------------------------------------------------------


def _lattice_points(template: DenseEmbedding, n: int) -> np.ndarray:
    """Centres of inner coarse voxels: where the template's vectors are its maps' own."""
    rng = np.random.default_rng(7)
    inner = [rng.integers(1, s - 1, n) for s in template.coarse.shape[1:]]
    return geometry.voxel_to_world(template.coarse_affine, np.stack(inner, -1).astype(float))


@pytest.mark.parametrize("flip", [False, True])
def test_planted_correspondences_match_the_reference(flip: bool) -> None:
    template = _template()
    shift = np.array([6.0, -4.0, 10.0])
    target = _moved(template, shift, noise=0.05, flip=flip)
    planted = _lattice_points(template, 40)
    pts = np.concatenate([planted, _points(60)])
    new = match_points(template, pts, target)
    _assert_same(new, _reference_match_points(template, pts, target))
    err = np.linalg.norm(new.points_mm[: len(planted)] - (planted + shift), axis=1)
    assert np.mean(err < 1e-6) >= 0.9  # the planted voxel itself


@pytest.mark.parametrize(("radius", "candidates"), [(None, 3), (9.0, 1), (30.0, 5)])
def test_oblique_grids_and_options_match_the_reference(radius, candidates) -> None:
    template, target = _template(seed=3), _oblique()
    pts = _points(60, seed=1)
    new = match_points(template, pts, target, radius, candidates)
    assert prepare_target(target).axes is None  # the general (per-voxel) interpolation
    _assert_same(new, _reference_match_points(template, pts, target, radius, candidates))


@pytest.mark.parametrize("per_row", [5, 40, 95])  # more entries per row than rows: split
def test_sampled_dot_products_equal_gathered_ones(per_row: int) -> None:
    g = torch.Generator().manual_seed(0)
    rows, q = torch.randn(30, 16, generator=g), torch.randn(4, 16, generator=g)
    flat = torch.randint(0, 30, (4, per_row), generator=g)  # repeats, any order
    expected = torch.einsum("bed,bd->be", rows[flat], q)
    torch.testing.assert_close(_fine_dots(rows, q, flat), expected, rtol=0, atol=1e-5)


def test_results_do_not_depend_on_the_chunk_size() -> None:
    template = _template()
    target = _moved(template, np.array([-8.0, 3.0, 2.0]), noise=0.5)
    pts = _points(70, seed=4)
    runs = [match_points(template, pts, target, chunk_size=c) for c in (1, 7, 4096)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.points_mm, runs[0].points_mm)
        np.testing.assert_allclose(other.scores, runs[0].scores, atol=1e-6)
        np.testing.assert_allclose(other.coarse_scores, runs[0].coarse_scores, atol=1e-6)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest block of memory (bytes) a torch operation allocates: outputs on a
    storage none of its inputs holds (views and in-place results are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        tensors = [
            t
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        ]
        held = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                if storage.data_ptr() not in held:
                    self.nbytes = max(self.nbytes, storage.nbytes())
        return out


def test_memory_is_bounded_by_the_chunk_not_by_the_number_of_points() -> None:
    template = _template()
    target = _moved(template, np.array([2.0, 2.0, 2.0]), noise=0.3)
    prepare_target(target)  # per-target state: sized by the target, built once
    chunk, largest = 64, []
    for n in (50, 150):  # one chunk, three chunks
        with _LargestAllocation() as mode:
            match_points(template, _points(n, seed=n), target, chunk_size=chunk)
        largest.append(mode.nbytes)
    assert largest[0] == largest[1]
    padded = math.prod(_padded(tuple(target.coarse.shape[1:])))
    per_point = SCORED_BYTES * 3 * 13**3  # 3 candidates x the 13^3 refinement box
    assert largest[0] <= max(4 * chunk * padded, MIN_BLOCK_BYTES, per_point)


def test_block_arithmetic_keeps_a_brain_under_the_budget() -> None:
    """1 mm brain (181 x 217 x 181): coarse 23 x 28 x 23 at stride 8, 12 mm radius at 2 mm."""
    n_coarse, n_scored, chunk = 23 * 28 * 23, 3 * 13**3, 1024
    points = fine_block(chunk, n_coarse, n_scored)
    assert points >= 1 and points * n_scored * SCORED_BYTES <= 4 * chunk * n_coarse
    assert 4 * chunk * math.prod(_padded((23, 28, 23))) < 100 * 2**20  # bytes per chunk
    assert fine_block(1, 10, 10**6) == 1  # always at least one point
    small = fine_block(64, 150, n_scored)  # small maps still refine several points at once
    assert small == MIN_BLOCK_BYTES // (SCORED_BYTES * n_scored) > 1


def _smooth(affine: np.ndarray, shape: tuple[int, ...], freqs: list[float]) -> torch.Tensor:
    w = torch.as_tensor(geometry.world_grid(affine, shape))
    feats = [
        f(w[..., a] * fr * 2 * math.pi)
        for a in range(3)
        for fr in freqs
        for f in (torch.sin, torch.cos)
    ]
    return F.normalize(torch.stack(feats).float(), dim=0)


def test_subvoxel_peak_is_off_by_default_and_closer_when_on() -> None:
    embs = []
    for origin in ((-40.0, -44.0, -36.0), (-38.0, -41.0, -35.0)):  # fine grids 2, 3, 1 mm apart
        img = _image_affine(origin)
        ca, fa = geometry.feature_affine(img, 8), geometry.feature_affine(img, 2)
        cs = tuple(math.ceil(n / 8) for n in SHAPE)
        fs = tuple(math.ceil(n / 2) for n in SHAPE)
        coarse = _smooth(ca, cs, [1 / 300.0, 1 / 150.0])
        embs.append(_embedding(coarse, _smooth(fa, fs, [1 / 60.0, 1 / 25.0]), img))
    template, target = embs
    pts = _points(40, seed=5, margin=8.0)
    plain = match_points(template, pts, target)
    _assert_same(plain, _reference_match_points(template, pts, target))
    sub = match_points(template, pts, target, subvoxel=True)
    np.testing.assert_array_equal(sub.scores, plain.scores)
    step = np.abs(sub.points_mm - plain.points_mm)
    assert step.max() <= 2.0 + 1e-9  # at most half a fine voxel (4 mm) per axis
    err_plain = np.linalg.norm(plain.points_mm - pts, axis=1).mean()
    err_sub = np.linalg.norm(sub.points_mm - pts, axis=1).mean()
    assert err_sub < 0.75 * err_plain


def test_edge_cases_behave_as_before() -> None:
    template = _template()
    target = _moved(template, np.zeros(3), noise=0.1)
    empty = match_points(template, np.zeros((0, 3)), target)
    assert empty.points_mm.shape == (0, 3) and empty.scores.shape == (0,)
    with pytest.raises(AnatomapError, match="outside the template image"):
        match_points(template, np.array([[500.0, 0.0, 0.0]]), target)
    pts = _points(5, seed=9)
    replaced = _moved(template, np.array([4.0, 0.0, 0.0]), noise=0.1, seed=2)
    first = match_points(template, pts, target)
    target.fine, target.coarse = replaced.fine, replaced.coarse  # new maps: new state
    _assert_same(
        match_points(template, pts, target), _reference_match_points(template, pts, target)
    )
    assert not np.array_equal(first.scores, match_points(template, pts, target).scores)
