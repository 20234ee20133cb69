"""Dense displacement fields in world millimetres: velocity fields, their exponentials and
inverses, and resampling through world -> world maps.

A field is stored on a grid with its own voxel -> world affine ``G`` as an array
``[X, Y, Z, 3]`` of world-mm displacements ``u``; it maps a world point ``x`` to
``x + u(x)``, ``u`` interpolated trilinearly (``grid_sample``, ``align_corners=True``, constant
beyond the border voxels). A stationary velocity field (SVF) ``v`` is integrated by scaling
and squaring (Arsigny et al., MICCAI 2006; as in VoxelMorph, Dalca et al. 2019, and
SynthMorph, Hoffmann et al. 2022): ``exp(v) = (exp(v / 2^N))^(2^N)``, a diffeomorphism whose
inverse is ``exp(-v)``. :meth:`Diffeomorphism.inverse` refines ``exp(-v)`` to the exact inverse
of the interpolated forward field, so round trips close to 1e-4 mm, and dense resampling
(through the forward field) agrees with the point maps.

Dense work never materialises world points: every affine step is folded into one
``affine_grid`` and only the displacement is sampled (:meth:`WorldMap.sampling_grid`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from anatomap import geometry


def grid_covering(
    lo: Sequence[float], hi: Sequence[float], spacing: float
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An RAS grid of ``spacing`` mm whose voxel centres span the world box ``[lo, hi]``."""
    lo_a, hi_a = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    shape = tuple(int(np.ceil((h - a) / spacing)) + 1 for a, h in zip(lo_a, hi_a, strict=True))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = (lo_a + hi_a) / 2.0 - spacing * (np.asarray(shape) - 1) / 2.0
    return affine, shape  # type: ignore[return-value]


def subdividing_grid(
    affine: np.ndarray, shape: Sequence[int], stride: int, margin: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A coarse grid whose voxel ``j`` sits at voxel ``stride * (j - margin)`` of the grid
    ``(affine, shape)`` and which covers it plus ``margin`` coarse voxels per side: fields on
    it upsample exactly onto the fine grid (:meth:`DisplacementField.on_grid`)."""
    coarse = np.asarray(affine, np.float64) @ np.diag([stride, stride, stride, 1.0])
    coarse = coarse @ geometry.translation([-margin] * 3)
    n = tuple(int(np.ceil((k - 1) / stride)) + 1 + 2 * margin for k in shape)
    return coarse, n  # type: ignore[return-value]


def normaliser(shape: Sequence[int]) -> np.ndarray:
    """4x4 map from voxel indices ``(i, j, k)`` of a box to ``grid_sample``'s ``(x, y, z)``
    coordinates (``align_corners=True``: first and last voxel centres at -1 and +1)."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for a, n in enumerate(shape):
        if n > 1:
            m[2 - a, a], m[2 - a, 3] = 2.0 / (n - 1), -1.0
        else:  # affine_grid puts a unit axis at 0; grid_sample reads its only voxel anywhere
            m[2 - a, a] = 1.0
    return m


def affine_sampling_grid(
    index_map: np.ndarray, out_shape: Sequence[int], in_shape: Sequence[int]
) -> torch.Tensor:
    """``grid_sample`` coordinates ``[1, *out_shape, 3]`` (float32) of the input-grid voxel
    ``index_map @ o`` for every output voxel ``o`` (``index_map``: 4x4, output -> input
    indices), built by ``affine_grid``."""
    theta = normaliser(in_shape) @ np.asarray(index_map, np.float64)
    theta = theta @ np.linalg.inv(normaliser(out_shape))
    size = (1, 1, *(int(n) for n in out_shape))
    return F.affine_grid(torch.as_tensor(theta[None, :3], dtype=torch.float32), size, True)


def sample(
    volume: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"
) -> torch.Tensor:
    """``grid_sample`` of ``volume [C, X, Y, Z]`` at ``grid [1, *s, 3]``: ``[C, *s]``."""
    out = F.grid_sample(
        volume[None].to(grid.dtype), grid, mode=mode, padding_mode=padding, align_corners=True
    )
    return out[0]


def _lin(m: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(m, np.float64)[:3, :3])


def _add_lin(grid: torch.Tensor, lin: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``grid [1, *s, 3] + lin @ u`` for a displacement volume ``u [3, *s]`` (one ``addmm``)."""
    flat = torch.addmm(grid.reshape(-1, 3), u.reshape(3, -1).T, lin.to(u.dtype).T)
    return flat.reshape(grid.shape)


def integrate_velocity(velocity: np.ndarray, affine: np.ndarray, steps: int = 7) -> np.ndarray:
    """Displacement ``[X, Y, Z, 3]`` (mm) of ``exp(v)`` for a velocity ``v [X, Y, Z, 3]`` (mm)
    on the grid ``affine``: ``u <- v / 2^steps``, then ``steps`` times ``u <- u + u o (id + u)``
    (scaling and squaring, Arsigny et al. 2006)."""
    shape = velocity.shape[:3]
    to_norm = _lin(normaliser(shape) @ np.linalg.inv(np.asarray(affine, np.float64)))
    base = affine_sampling_grid(np.eye(4), shape, shape).double()
    u = torch.as_tensor(np.moveaxis(np.asarray(velocity, np.float64), -1, 0) / 2.0**steps)
    for _ in range(steps):
        u = u + sample(u, _add_lin(base, to_norm, u), padding="border")
    return np.ascontiguousarray(np.moveaxis(u.numpy(), 0, -1))


def random_velocity(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: float,
    scales_mm: Sequence[float],
    peaks_mm: Sequence[float],
) -> np.ndarray:
    """A smooth random velocity ``[X, Y, Z, 3]`` (mm) on a grid of ``shape`` and ``spacing``:
    one Gaussian-noise component per scale (drawn on a control grid of ``scale / 2`` mm,
    smoothed over one control spacing, upsampled trilinearly) with a peak norm of its
    ``peaks_mm`` entry (SynthMorph's multi-scale noise, Hoffmann et al. 2022)."""
    from scipy.ndimage import gaussian_filter

    extent = (np.asarray(shape, np.float64) - 1) * float(spacing)
    total = torch.zeros((3, *shape), dtype=torch.float64)
    for scale, peak in zip(scales_mm, peaks_mm, strict=True):
        n = [max(int(np.ceil(e / (scale / 2.0))) + 1, 2) for e in extent]
        noise = gaussian_filter(rng.standard_normal((3, *n)), (0, 1.0, 1.0, 1.0), mode="nearest")
        up = F.interpolate(
            torch.as_tensor(noise)[None], size=tuple(shape), mode="trilinear", align_corners=True
        )[0]
        top = float(torch.linalg.norm(up, dim=0).max())
        total += up * (float(peak) / top if top > 0 else 0.0)
    return np.ascontiguousarray(np.moveaxis(total.numpy(), 0, -1))


@dataclass(frozen=True)
class DisplacementField:
    """``x -> x + u(x)``: world-mm displacements ``disp [X, Y, Z, 3]`` on the grid ``affine``."""

    disp: np.ndarray
    affine: np.ndarray

    @functools.cached_property
    def volume(self) -> torch.Tensor:
        """The displacement as a float64 tensor ``[3, X, Y, Z]``."""
        return torch.as_tensor(np.moveaxis(np.asarray(self.disp, np.float64), -1, 0).copy())

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.disp.shape[:3])  # type: ignore[return-value]

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """``u`` at world points ``[..., 3]`` (float64, trilinear)."""
        x = np.asarray(points, np.float64)
        m = normaliser(self.shape) @ np.linalg.inv(np.asarray(self.affine, np.float64))
        grid = torch.as_tensor(geometry.apply_affine(m, x.reshape(-1, 3))).reshape(1, -1, 1, 1, 3)
        return sample(self.volume, grid, padding="border").reshape(3, -1).T.reshape(x.shape).numpy()

    def __call__(self, points: np.ndarray) -> np.ndarray:
        x = np.asarray(points, np.float64)
        return x + self.displacement(x)

    def on_grid(self, affine: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
        """``u`` at every voxel of the grid ``(affine, shape)``: ``[3, *shape]`` float32.

        When the field's grid subdivides that grid (field voxel ``j`` at grid voxel
        ``s * (j - margin)``, integer ``s`` and ``margin``: the layout
        :func:`subdividing_grid` makes) this is a trilinear upsampling (``interpolate``),
        equal to point-wise sampling and much faster; otherwise ``grid_sample``.
        """
        m = np.linalg.inv(np.asarray(self.affine, np.float64)) @ np.asarray(affine, np.float64)
        s = 1.0 / m[0, 0] if m[0, 0] > 0 else 0.0
        start = m[:3, 3] * s  # upsampled-field index of grid voxel 0
        full = [round(s) * (n - 1) + 1 for n in self.shape]
        if (
            s >= 1
            and abs(s - round(s)) < 1e-9
            and np.allclose(m[:3, :3], np.eye(3) / s, atol=1e-12)
            and np.allclose(start, np.round(start), atol=1e-6)
            and all(
                a >= 0 and a + n <= f for a, n, f in zip(np.round(start), shape, full, strict=True)
            )
        ):
            a = [int(v) for v in np.round(start)]
            up = F.interpolate(
                self.volume.float()[None], size=full, mode="trilinear", align_corners=True
            )[0]
            return up[:, a[0] : a[0] + shape[0], a[1] : a[1] + shape[1], a[2] : a[2] + shape[2]]
        at = affine_sampling_grid(m, shape, self.shape)
        return sample(self.volume.float(), at, padding="border")


class Diffeomorphism:
    """``phi = exp(v)`` and ``psi = exp(-v)`` of a stationary velocity field ``v [X, Y, Z, 3]``
    (mm) on the grid ``affine``; each is integrated on first use (scaling and squaring)."""

    def __init__(self, velocity: np.ndarray, affine: np.ndarray, steps: int = 7) -> None:
        self.velocity = np.asarray(velocity, np.float64)
        self.affine = np.asarray(affine, np.float64)
        self.steps = int(steps)

    @functools.cached_property
    def forward(self) -> DisplacementField:
        return DisplacementField(
            integrate_velocity(self.velocity, self.affine, self.steps), self.affine
        )

    @functools.cached_property
    def backward(self) -> DisplacementField:
        return DisplacementField(
            integrate_velocity(-self.velocity, self.affine, self.steps), self.affine
        )

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return self.forward(points)

    def inverse(self, points: np.ndarray, tol: float = 1e-4, max_iter: int = 50) -> np.ndarray:
        """``x`` with ``phi(x) = y`` for world points ``y [..., 3]``, to ``tol`` mm.

        Starts from ``psi(y)`` and iterates ``x <- x + psi(y) - psi(phi(x))``: a quasi-Newton
        step whose Jacobian comes from ``psi``. Raises ``RuntimeError`` if it stalls.
        """
        y = np.asarray(points, np.float64)
        x0 = self.backward(y)
        x = x0
        for _ in range(max_iter):
            fx = self.forward(x)
            if np.max(np.abs(fx - y), initial=0.0) < tol:
                return x
            x = x + x0 - self.backward(fx)
        err = float(np.max(np.abs(self.forward(x) - y), initial=0.0))
        if err >= 10 * tol:
            raise RuntimeError(f"field inversion did not converge (residual {err:.3g} mm)")
        return x


@dataclass(frozen=True)
class WorldMap:
    """The world -> world map ``y = post @ phi(pre @ x)`` and its exact inverse.

    ``pre`` and ``post`` are 4x4 world affines; ``phi`` a :class:`Diffeomorphism` (or none).
    """

    pre: np.ndarray = field(default_factory=lambda: np.eye(4))
    phi: Diffeomorphism | None = None
    post: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        x = geometry.apply_affine(np.asarray(self.pre, np.float64), np.asarray(points, np.float64))
        if self.phi is not None:
            x = self.phi(x)
        return geometry.apply_affine(np.asarray(self.post, np.float64), x)

    def inverse(self, points: np.ndarray, tol: float = 1e-4) -> np.ndarray:
        """World points mapped back (``phi`` inverted to ``tol`` mm)."""
        y = geometry.world_to_voxel(self.post, np.asarray(points, np.float64))
        if self.phi is not None:
            y = self.phi.inverse(y, tol=tol)
        return geometry.world_to_voxel(self.pre, y)

    def sampling_grid(
        self,
        out_affine: np.ndarray,
        out_shape: Sequence[int],
        in_affine: np.ndarray,
        in_shape: Sequence[int],
    ) -> torch.Tensor:
        """``grid_sample`` coordinates ``[1, *out_shape, 3]`` (float32) in the grid
        ``(in_affine, in_shape)`` of the map's image of every voxel of the output grid."""
        to_in = np.linalg.inv(np.asarray(in_affine, np.float64)) @ self.post
        grid = affine_sampling_grid(to_in @ self.pre @ out_affine, out_shape, in_shape)
        if self.phi is None:
            return grid
        u = self.phi.forward.on_grid(self.pre @ out_affine, out_shape)
        return _add_lin(grid, _lin(normaliser(in_shape) @ to_in), u)

    def map_grid(self, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """The map at every voxel of the grid ``(affine, shape)``: ``[*shape, 3]`` world mm."""
        unit = (3, 3, 3)  # sample "world as voxel index" on a box whose normaliser is x - 1
        grid = self.sampling_grid(affine, shape, np.eye(4), unit)[0]
        back = torch.as_tensor(np.linalg.inv(normaliser(unit)), dtype=torch.float32)
        return geometry.apply_affine(back, grid).numpy()


def resample(
    volume: np.ndarray,
    affine: np.ndarray,
    world_map: WorldMap,
    out_affine: np.ndarray,
    out_shape: Sequence[int],
    mode: str = "bilinear",
    pad: float = 0.0,
) -> np.ndarray:
    """``volume [C, *s]`` (grid ``affine``) resampled onto the grid ``(out_affine, out_shape)``
    through ``world_map`` (output world -> volume world, the pull direction): ``[C, *out]``
    float32, ``pad`` outside the volume; ``mode`` ``"bilinear"`` or ``"nearest"``."""
    grid = world_map.sampling_grid(out_affine, out_shape, affine, volume.shape[1:])
    vol = torch.as_tensor(np.asarray(volume, np.float32))
    return (sample(vol - pad, grid, mode=mode) + pad).numpy()
