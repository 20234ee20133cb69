"""Located-view sampling: crops that carry their own voxel-to-world affine.

A :class:`ViewSpec` says what views a method wants; :func:`sample_views` cuts them from a
cached subject; :class:`LocatedViewDataset` is the map-style torch dataset the trainer uses.
The sampler knows nothing of any method. Like TorchIO's samplers, every random choice is
drawn from a generator seeded by ``(seed, epoch, index)``, so a sample can be replayed and
DataLoader workers never share a random stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from anatomap import geometry
from anatomap.data.cache import Cache, CachedSubject
from anatomap.errors import ConfigError


@dataclass(frozen=True)
class IntensityAugment:
    """Per-view intensity changes (MONAI random transforms, seeded from the sample's RNG):
    gamma in ``gamma``, multiplicative scale ``1 + U(scale)``, Gaussian noise of ``noise_std``.
    Geometry is untouched, so every voxel keeps its world position (SAM, Yan et al. 2022)."""

    gamma: tuple[float, float] = (0.7, 1.5)
    scale: tuple[float, float] = (-0.1, 0.1)
    noise_std: float = 0.03

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from monai.transforms import RandAdjustContrast, RandGaussianNoise, RandScaleIntensity

        out = torch.from_numpy(np.ascontiguousarray(image))
        for t in (
            RandAdjustContrast(prob=1.0, gamma=self.gamma),
            RandScaleIntensity(factors=self.scale, prob=1.0),
            RandGaussianNoise(prob=1.0, std=self.noise_std),
        ):
            t.set_random_state(seed=int(rng.integers(2**31 - 1)))
            out = torch.as_tensor(t(out))
        return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class ViewSpec:
    """What views to cut from each volume.

    - ``size``: view shape in voxels (2 entries for 2-D views: axial slices of the volume).
    - ``scale``: range of the physical-size factor drawn per view; a view covers
      ``size * s`` source voxels, resampled to ``size`` (scale jitter, as SAM does).
    - ``foreground``: centres drawn on foreground voxels (else anywhere in the volume).
    - ``min_overlap`` / ``max_overlap``: bounds on the fraction of view 0 that each other
      view covers (rejection sampling, ``max_tries`` tries; the closest try is kept).
    """

    num_views: int = 2
    size: tuple[int, ...] = (32, 32, 32)
    scale: tuple[float, float] = (1.0, 1.0)
    foreground: bool = True
    min_overlap: float | None = None
    max_overlap: float | None = None
    max_tries: int = 50
    pad_value: float = 0.0
    intensity: IntensityAugment | None = None

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ConfigError(f"ViewSpec.num_views must be >= 1, got {self.num_views}")
        if len(self.size) not in (2, 3) or min(self.size) < 1:
            raise ConfigError(f"ViewSpec.size must be 2 or 3 positive ints, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ConfigError(f"ViewSpec.scale must satisfy 0 < low <= high, got {self.scale}")


def _read_box(image: np.ndarray, start: np.ndarray, shape: np.ndarray, pad: float) -> np.ndarray:
    """Copy ``image[:, start:start+shape]`` (3-D spatial), padding outside the volume."""
    vol_shape = np.asarray(image.shape[1:])
    lo = np.maximum(start, 0)
    hi = np.minimum(start + shape, vol_shape)
    out = np.full((image.shape[0], *shape), pad, dtype=np.float32)
    if np.all(hi > lo):
        src = image[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d0 = lo - start
        d1 = d0 + (hi - lo)
        out[:, d0[0] : d1[0], d0[1] : d1[1], d0[2] : d1[2]] = src
    return out


def _box_shape(spec: ViewSpec) -> np.ndarray:
    return np.asarray(spec.size if len(spec.size) == 3 else (*spec.size, 1), int)


def _draw_centre(subject: CachedSubject, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    fg = subject.foreground if spec.foreground else None
    if fg is not None and len(fg):
        return fg[rng.integers(len(fg))].astype(np.float64)
    return rng.uniform(0, np.asarray(subject.shape, np.float64) - 1)


def cut_view(
    subject: CachedSubject,
    centre: np.ndarray,
    src_shape: np.ndarray,
    out_shape: np.ndarray,
    pad: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a box of ``src_shape`` voxels centred near voxel ``centre``; resize to ``out_shape``.

    Returns the view ``[C, *out_shape]`` and its affine (voxel -> world mm).
    """
    start = np.round(centre - (src_shape - 1) / 2.0).astype(int)
    box = _read_box(subject.image, start, src_shape, pad)
    affine = geometry.crop_affine(subject.affine, start)
    if np.any(src_shape != out_shape):
        t = torch.from_numpy(box)[None]
        box = F.interpolate(t, size=tuple(int(s) for s in out_shape), mode="trilinear")[0].numpy()
        affine = geometry.resized_affine(affine, src_shape, out_shape)
    return box, affine


def sample_views(
    subject: CachedSubject, spec: ViewSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Located views of one subject: images ``[V, C, *size]`` and affines ``[V, 4, 4]``."""
    out_shape = _box_shape(spec)
    images, affines = [], []
    first: tuple[np.ndarray, np.ndarray] | None = None
    constrained = spec.min_overlap is not None or spec.max_overlap is not None
    lo_ov = spec.min_overlap if spec.min_overlap is not None else 0.0
    hi_ov = spec.max_overlap if spec.max_overlap is not None else 1.0
    for v in range(spec.num_views):
        best = None
        tries = spec.max_tries if (constrained and v > 0) else 1
        for _ in range(tries):
            s = rng.uniform(*spec.scale, size=3)
            src_shape = np.maximum(np.round(out_shape * s).astype(int), 1)
            if len(spec.size) == 2:
                src_shape[2] = 1
            if constrained and first is not None:
                c0, shape0 = first
                # A random radius per try puts mass on both small and large offsets.
                reach = rng.uniform() * (shape0 + src_shape) / 2.0
                centre = c0 + rng.uniform(-1, 1, size=3) * reach
                centre = np.clip(centre, 0, np.asarray(subject.shape) - 1)
            else:
                centre = _draw_centre(subject, spec, rng)
            if not constrained or first is None:
                best = (centre, src_shape)
                break
            start0 = np.round(first[0] - (first[1] - 1) / 2.0)
            start = np.round(centre - (src_shape - 1) / 2.0)
            ov = geometry.overlap_fraction(
                geometry.crop_affine(subject.affine, start0),
                first[1],
                geometry.crop_affine(subject.affine, start),
                src_shape,
            )
            miss = max(lo_ov - ov, ov - hi_ov, 0.0)
            if best is None or miss < best[2]:
                best = (centre, src_shape, miss)
            if miss == 0.0:
                break
        assert best is not None
        centre, src_shape = best[0], best[1]
        if first is None:
            first = (centre, src_shape)
        img, aff = cut_view(subject, centre, src_shape, out_shape, spec.pad_value)
        if spec.intensity is not None:
            img = spec.intensity.apply(img, rng)
        if len(spec.size) == 2:
            img = img[..., 0]
        images.append(img)
        affines.append(aff)
    return np.stack(images), np.stack(affines)


class LocatedViewDataset(Dataset):
    """Map-style dataset of located views.

    Index ``epoch * samples_per_epoch + i`` is sample ``i`` of that epoch and is fully
    determined by ``(seed, epoch, i)``; :class:`EpochSampler` produces such indices, so
    DataLoader workers and DDP ranks never share a random stream. Subjects are visited in a
    fresh permutation each round.
    """

    def __init__(
        self,
        cache: Cache,
        subjects: list[str],
        spec: ViewSpec,
        samples_per_epoch: int,
        seed: int = 0,
    ) -> None:
        if not subjects:
            raise ConfigError("no subjects to sample from (all held out, or an empty cache)")
        missing = [s for s in subjects if s not in cache]
        if missing:
            raise ConfigError(f"subjects not in cache {cache.root}: {missing[:5]}")
        self.cache = cache
        self.subjects = list(subjects)
        self.spec = spec
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed

    def __len__(self) -> int:
        return self.samples_per_epoch

    def locate(self, index: int) -> tuple[str, np.random.Generator]:
        """Subject and random generator of global sample ``index``."""
        epoch, i = divmod(int(index), self.samples_per_epoch)
        n = len(self.subjects)
        perm = np.random.default_rng([self.seed, epoch, i // n, 7]).permutation(n)
        return self.subjects[perm[i % n]], np.random.default_rng([self.seed, epoch, i])

    def __getitem__(self, index: int) -> dict:
        sid, rng = self.locate(index)
        subject = self.cache[sid]
        images, affines = sample_views(subject, self.spec, rng)
        return {
            "image": torch.from_numpy(images),
            "affine": torch.from_numpy(affines),
            "modality_mask": torch.from_numpy(subject.present.copy()),
            "subject": sid,
        }


class EpochSampler(Sampler[int]):
    """Yields ``epoch * n + i`` for ``i`` in ``range(n)``; Lightning calls ``set_epoch``
    (also through its DDP wrapper, which then shards these indices across ranks)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.n
        return iter(range(base, base + self.n))
