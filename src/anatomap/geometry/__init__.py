"""World-millimetre geometry: the only module that does affine arithmetic.

Every view anatomap produces carries a 4x4 affine that maps voxel indices ``(i, j, k)``
(array axis order) to world coordinates in millimetres, RAS+ after preprocessing.
Every self-supervised target of every method (crop-centre distances for ISImed,
Jabareen et al. 2024; voxel correspondences for SAM, Yan et al. 2022; gap matrices for
Spatial-Aware, Zhang et al. 2025; overlaps for VoCo) is computed from those affines with
the functions below. Voxel centres sit at integer indices (NIfTI / ITK convention).

All functions accept NumPy arrays or torch tensors and return the same kind; leading
batch dimensions are broadcast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _is_torch(x: object) -> bool:
    return isinstance(x, torch.Tensor)


def _inv(a: Array) -> Array:
    return torch.linalg.inv(a) if _is_torch(a) else np.linalg.inv(a)


def _pad3(index: np.ndarray) -> np.ndarray:
    """Voxel indices of a 2-D image are ``(i, j, 0)`` under its 4x4 affine."""
    return np.concatenate([index, np.zeros(3 - index.shape[-1])]) if index.shape[-1] < 3 else index


def apply_affine(affine: Array, points: Array) -> Array:
    """Map ``points [..., 3]`` through ``affine [..., 4, 4]`` (broadcast over leading dims).

    ``affine`` of shape ``[..., 4, 4]`` is applied to points ``[..., N, 3]`` when it has one
    fewer leading dimension than the points, i.e. one affine per set of points.
    """
    lin = affine[..., :3, :3]
    off = affine[..., :3, 3]
    if points.ndim == affine.ndim:  # [..., N, 3] with [..., 4, 4]
        lin, off = lin[..., None, :, :], off[..., None, :]
    # Three multiply-adds instead of a (N, 3) x (3, 3) matmul: BLAS is slow for k = 3.
    return (
        points[..., 0:1] * lin[..., :, 0]
        + points[..., 1:2] * lin[..., :, 1]
        + points[..., 2:3] * lin[..., :, 2]
        + off
    )


def voxel_to_world(affine: Array, ijk: Array) -> Array:
    """World coordinates (mm) of voxel indices ``ijk [..., 3]``."""
    return apply_affine(affine, ijk)


def world_to_voxel(affine: Array, xyz: Array) -> Array:
    """Continuous voxel indices of world points ``xyz [..., 3]`` (mm)."""
    return apply_affine(_inv(affine), xyz)


def spacing(affine: Array) -> Array:
    """Voxel size along each array axis (mm): the norms of the affine's columns."""
    cols = affine[..., :3, :3]
    if _is_torch(cols):
        return torch.linalg.norm(cols, dim=-2)
    return np.linalg.norm(cols, axis=-2)


def translation(offset: Sequence[float] | np.ndarray) -> np.ndarray:
    """4x4 matrix that shifts voxel indices by ``offset`` (float64 NumPy)."""
    t = np.eye(4)
    t[:3, 3] = np.asarray(offset, dtype=np.float64)
    return t


def crop_affine(affine: Array, start: Sequence[float] | Array) -> Array:
    """Affine of a crop whose voxel 0 is voxel ``start`` of the source.

    For every crop index ``c``: ``crop_affine(A, s) @ c == A @ (c + s)``.
    """
    t = translation(start)
    if _is_torch(affine):
        return affine @ torch.as_tensor(t, dtype=affine.dtype, device=affine.device)
    return affine @ t


def resized_affine(affine: Array, in_shape: Sequence[int], out_shape: Sequence[int]) -> Array:
    """Affine of a box of ``in_shape`` voxels resampled onto ``out_shape`` voxels.

    The box keeps its physical extent and its corners-of-the-box alignment: the output grid
    covers the same field of view (``align_corners=False`` convention, as torch's
    ``interpolate``), so voxel ``o`` of the output sits at input index
    ``(o + 0.5) * in / out - 0.5``.
    """
    scale = np.asarray(in_shape, np.float64) / np.asarray(out_shape, np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = 0.5 * scale - 0.5
    if _is_torch(affine):
        return affine @ torch.as_tensor(m, dtype=affine.dtype, device=affine.device)
    return affine @ m


def box_center(affine: Array, shape: Sequence[int]) -> Array:
    """World centre (mm) of a box of ``shape`` voxels whose voxel 0 maps through ``affine``."""
    c = _pad3((np.asarray(shape, np.float64) - 1.0) / 2.0)
    if _is_torch(affine):
        return voxel_to_world(affine, torch.as_tensor(c, dtype=affine.dtype, device=affine.device))
    return voxel_to_world(affine, c)


def box_corners(affine: Array, shape: Sequence[int]) -> Array:
    """World positions of the 2^d outer corners (voxel faces, not centres) of a box."""
    s = np.asarray(shape, np.float64)
    d = len(s)
    grid = np.stack(np.meshgrid(*[[-0.5, n - 0.5] for n in s], indexing="ij"), -1).reshape(-1, d)
    if d == 2:
        grid = np.concatenate([grid, np.zeros((len(grid), 1))], -1)
    if _is_torch(affine):
        grid_t = torch.as_tensor(grid, dtype=affine.dtype, device=affine.device)
        return apply_affine(affine, grid_t)
    return apply_affine(affine, grid)


def world_grid(affine: Array, shape: Sequence[int]) -> Array:
    """World coordinates of every voxel of a box: ``[*shape, 3]`` (mm)."""
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    if len(shape) == 2:
        ijk = np.concatenate([ijk, np.zeros((*ijk.shape[:-1], 1))], -1)
    if _is_torch(affine):
        ijk_t = torch.as_tensor(ijk, dtype=affine.dtype, device=affine.device)
        return apply_affine(affine, ijk_t.reshape(-1, 3)).reshape(*shape, 3)
    return apply_affine(affine, ijk.reshape(-1, 3)).reshape(*shape, 3)


def pairwise_distances(points: Array) -> Array:
    """Euclidean distance matrix ``[..., N, N]`` of ``points [..., N, 3]`` (mm)."""
    diff = points[..., :, None, :] - points[..., None, :, :]
    if _is_torch(points):
        return torch.linalg.norm(diff, dim=-1)
    return np.linalg.norm(diff, axis=-1)


def pairwise_gaps(points: Array) -> Array:
    """Per-axis gaps ``[..., N, N, 3]``: entry ``(i, j)`` is ``points[j] - points[i]`` (mm)."""
    return points[..., None, :, :] - points[..., :, None, :]


def world_bounds(affine: Array, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (min, max corners, mm) of a voxel box."""
    corners = np.asarray(
        box_corners(affine.detach().cpu().numpy() if _is_torch(affine) else affine, shape)
    )
    return corners.min(axis=-2), corners.max(axis=-2)


def overlap_fraction(
    affine_a: np.ndarray, shape_a: Sequence[int], affine_b: np.ndarray, shape_b: Sequence[int]
) -> float:
    """Fraction of box A's world volume that box B covers.

    Exact for boxes whose axes are aligned with the world axes (every view of a canonical
    RAS+ cache); for oblique boxes it is computed on their world bounding boxes.
    """
    lo_a, hi_a = world_bounds(affine_a, shape_a)
    lo_b, hi_b = world_bounds(affine_b, shape_b)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None)
    vol_a = np.prod(hi_a - lo_a)
    return float(np.prod(inter) / vol_a) if vol_a > 0 else 0.0


def orientation_codes(affine: np.ndarray) -> str:
    """Axis codes such as ``'RAS'`` or ``'LPS'`` of a voxel-to-world (RAS+) affine."""
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(np.asarray(affine, np.float64)))


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flip between ITK/DICOM's LPS+ world and NIfTI's RAS+ world (its own inverse)."""


def reorient(
    array: np.ndarray, affine: np.ndarray, codes: str = "RAS"
) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip ``array``'s first three axes so that they point along ``codes``.

    No resampling: voxels are only reordered, so every voxel keeps its world position. Returns
    the reordered array and its new affine (nibabel's orientation algebra). Extra trailing
    axes (channels, time) are kept. 2-D arrays are handled as one-slice volumes.
    """
    import nibabel as nib

    squeeze = array.ndim == 2
    arr = array[..., None] if squeeze else array
    current = nib.orientations.io_orientation(np.asarray(affine, np.float64))
    target = nib.orientations.axcodes2ornt(tuple(codes))
    transform = nib.orientations.ornt_transform(current, target)
    out = nib.orientations.apply_orientation(arr, transform)
    new_affine = np.asarray(affine, np.float64) @ nib.orientations.inv_ornt_aff(
        transform, arr.shape
    )
    out = np.ascontiguousarray(out)
    if squeeze:
        out = out[..., 0] if out.shape[-1] == 1 else out
    return out, new_affine


def feature_affine(affine: Array, stride: int | float, offset: float = 0.0) -> Array:
    """Affine of a feature map computed at ``stride`` from a view whose affine is ``affine``.

    Feature voxel ``o`` sits at view voxel ``stride * o + offset`` (``offset`` 0 for
    stride-2 convolutions with kernel 3 and padding 1, as in MONAI's residual units).
    """
    m = np.eye(4)
    m[:3, :3] *= float(stride)
    m[:3, 3] = float(offset)
    if _is_torch(affine):
        return affine @ torch.as_tensor(m, dtype=affine.dtype, device=affine.device)
    return affine @ m


def cross_distances(a: Array, b: Array) -> Array:
    """Distances ``[..., N, M]`` between points ``a [..., N, 3]`` and ``b [..., M, 3]`` (mm)."""
    if _is_torch(a):
        return torch.cdist(a, b)
    return np.linalg.norm(a[..., :, None, :] - b[..., None, :, :], axis=-1)


def grid_sample_coords(ijk: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Continuous voxel indices ``[..., 3]`` -> the normalised ``[-1, 1]`` coordinates that
    ``torch.nn.functional.grid_sample(..., align_corners=True)`` expects (last dim x, y, z
    ordered as the array's last, middle, first spatial axis)."""
    size = torch.as_tensor(list(shape), dtype=ijk.dtype, device=ijk.device)
    norm = 2.0 * ijk / (size - 1).clamp_min(1) - 1.0
    return norm.flip(-1)


def inside(ijk: Array, shape: Sequence[int], margin: float = 0.0) -> Array:
    """Whether continuous voxel indices lie within ``[margin, n - 1 - margin]`` on every axis."""
    if _is_torch(ijk):
        hi = torch.as_tensor(list(shape), dtype=ijk.dtype, device=ijk.device) - 1 - margin
        return ((ijk >= margin) & (ijk <= hi)).all(-1)
    hi = np.asarray(shape, np.float64) - 1 - margin
    return np.all((ijk >= margin) & (ijk <= hi), axis=-1)


def voxel_to_grid(ijk: Array, shape: Sequence[int]) -> Array:
    """Sampling coordinates in ``[-1, 1]`` of continuous voxel indices ``ijk [..., 3]`` of a
    box of ``shape`` voxels, for ``torch.nn.functional.grid_sample(align_corners=False)``.

    The box's outer faces (index ``-0.5`` and ``n - 0.5``) map to -1 and +1, so a feature map
    that covers the same field of view at any stride is sampled at the same world point. The
    result has ``len(shape)`` components in grid_sample's order (last array axis first); the
    third index of a 2-D box is dropped.
    """
    d = len(shape)
    v = ijk[..., :d]
    size = np.asarray(shape, np.float64)
    if _is_torch(v):
        size_t = torch.as_tensor(size, dtype=v.dtype, device=v.device)
        return ((2.0 * v + 1.0) / size_t - 1.0).flip(-1)
    return ((2.0 * v + 1.0) / size - 1.0)[..., ::-1]


def overlap_matrix(
    affines_a: Array, shape_a: Sequence[int], affines_b: Array, shape_b: Sequence[int]
) -> np.ndarray:
    """Pairwise :func:`overlap_fraction`: ``[..., N, M]``, the fraction of each box of A
    (``affines_a [..., N, 4, 4]``) that each box of B (``affines_b [..., M, 4, 4]``) covers."""

    def bounds(affines: Array, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(affines.detach().cpu().numpy() if _is_torch(affines) else affines)
        unit = np.asarray(box_corners(np.eye(4), shape))  # corners in voxel units
        corners = apply_affine(a, np.broadcast_to(unit, (*a.shape[:-2], *unit.shape)))
        return corners.min(-2), corners.max(-2)

    lo_a, hi_a = bounds(affines_a, shape_a)
    lo_b, hi_b = bounds(affines_b, shape_b)
    hi = np.minimum(hi_a[..., :, None, :], hi_b[..., None, :, :])
    lo = np.maximum(lo_a[..., :, None, :], lo_b[..., None, :, :])
    inter = np.clip(hi - lo, 0.0, None).prod(-1)
    vol_a = (hi_a - lo_a).prod(-1)[..., :, None]
    return np.where(vol_a > 0, inter / np.where(vol_a > 0, vol_a, 1.0), 0.0)


def sample_map(feature_map: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``[N, D]`` of ``feature_map [D, *s]`` at voxel indices ``ijk [N, 3]``,
    re-normalised to unit length."""
    grid = grid_sample_coords(ijk.to(feature_map.dtype), feature_map.shape[1:])
    out = F.grid_sample(
        feature_map[None], grid.view(1, -1, 1, 1, 3), align_corners=True, mode="bilinear"
    )
    return F.normalize(out.view(feature_map.shape[0], -1).T, dim=-1)


_FIELDS = (
    "Diffeomorphism",
    "DisplacementField",
    "WorldMap",
    "integrate_velocity",
    "random_velocity",
    "resample",
)


def __getattr__(name: str) -> object:
    """The dense-field API of :mod:`anatomap.geometry.fields` (SVFs, exact world maps) also
    as ``geometry.WorldMap`` etc., imported on first use."""
    if name in _FIELDS:
        from anatomap.geometry import fields

        return getattr(fields, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
