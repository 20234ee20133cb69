"""Located-view sampling: crops that carry their own voxel-to-world affine.

A :class:`ViewSpec` says what views a method wants; :func:`sample_views` cuts them from a
cached subject; :class:`LocatedViewDataset` is the map-style torch dataset the trainer uses.
The sampler knows nothing of any method. Like TorchIO's samplers, every random choice is
drawn from a generator seeded by ``(seed, epoch, index)``, so a sample can be replayed and
DataLoader workers never share a random stream.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, default_collate, get_worker_info

from anatomap import geometry
from anatomap.data.cache import Cache, CachedSubject
from anatomap.errors import ConfigError
from anatomap.io.lock import pid_alive


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

    def apply_batch(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """The same changes to every view of a batch at once, on its device: ``images
        [B, V, C, *S]``, one draw per view ``[C, *S]`` as :meth:`apply` makes (MONAI's
        ``AdjustContrast`` formula on the view's range, ``v * (1 + f)``, then noise of a std
        drawn in ``[0, noise_std]`` as ``RandGaussianNoise`` does). ``seed`` fixes every draw.
        One pass over the batch instead of three MONAI transforms per view in the loader."""
        x = images.reshape(images.shape[0] * images.shape[1], -1).float()
        gen = torch.Generator(device=x.device).manual_seed(seed)
        u = torch.rand(len(x), 3, generator=gen, device=x.device)
        gamma = self.gamma[0] + (self.gamma[1] - self.gamma[0]) * u[:, :1]
        factor = 1.0 + self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 1:2]
        std = self.noise_std * u[:, 2:]
        low = x.amin(1, keepdim=True)
        span = x.amax(1, keepdim=True) - low
        x = ((x - low) / (span + 1e-7)).pow(gamma) * span + low
        x = x * factor + torch.randn(x.shape, generator=gen, device=x.device) * std
        return x.view(images.shape).to(images.dtype)


@dataclass(frozen=True)
class ViewSpec:
    """What views to cut from each volume.

    - ``size``: view shape in voxels (2 entries for 2-D views: axial slices of the volume).
    - ``scale``: range of the physical-size factor drawn per view; a view covers
      ``size * s`` source voxels, resampled to ``size`` (scale jitter, as SAM does).
    - ``foreground``: centres drawn on foreground voxels (else anywhere in the volume).
    - ``min_overlap`` / ``max_overlap``: bounds on the fraction of view 0 that each other
      view covers (rejection sampling, ``max_tries`` tries; the closest try is kept).
    - ``modality_per_view``: each view shows ONE of the subject's present modalities (a
      random permutation of them, cycled over the views, so two views of a subject with two
      or more show different ones): views ``[V, 1, *size]``. With several contrast renders of
      one anatomy (``anatomap data synth --renders``) positives then span contrasts.
      ``cross_modality``: the share of samples whose views show different modalities; the
      others show one modality in every view (a mix that still teaches fine, same-contrast
      detail).
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
    modality_per_view: bool = False
    cross_modality: float = 1.0

    def __post_init__(self) -> None:
        if self.num_views < 1:
            raise ConfigError(f"ViewSpec.num_views must be >= 1, got {self.num_views}")
        if len(self.size) not in (2, 3) or min(self.size) < 1:
            raise ConfigError(f"ViewSpec.size must be 2 or 3 positive ints, got {self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ConfigError(f"ViewSpec.scale must satisfy 0 < low <= high, got {self.scale}")


def _copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` with torch's vectorised casts (float16 -> float32 is ~20x faster than
    NumPy's). ``src`` may be a read-only memory map: torch only reads it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "array is not writable": read only
            source = torch.from_numpy(src)
        torch.from_numpy(dst).copy_(source)
    except TypeError:  # a dtype torch lacks (e.g. big-endian): NumPy's cast
        np.copyto(dst, src, casting="unsafe")


def _read_box(
    image: np.ndarray,
    start: np.ndarray,
    shape: np.ndarray,
    pad: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Copy ``image[:, start:start+shape]`` (3-D spatial) into ``out`` (float32, allocated if
    ``None``), padding outside the volume."""
    s = [int(v) for v in start]
    n = [int(v) for v in shape]
    lo = [max(a, 0) for a in s]
    hi = [min(a + b, int(m)) for a, b, m in zip(s, n, image.shape[1:], strict=True)]
    if out is None:
        out = np.empty((image.shape[0], *n), dtype=np.float32)
    inside = lo == s and all(h == a + b for h, a, b in zip(hi, s, n, strict=True))
    if not inside:
        out.fill(pad)
    if all(h > lo_ for h, lo_ in zip(hi, lo, strict=True)):
        src = image[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d0 = [a - b for a, b in zip(lo, s, strict=True)]
        d1 = [a + h - b for a, h, b in zip(d0, hi, lo, strict=True)]
        _copy_into(out[:, d0[0] : d1[0], d0[1] : d1[1], d0[2] : d1[2]], src)
    return out


def _box_shape(spec: ViewSpec) -> np.ndarray:
    return np.asarray(spec.size if len(spec.size) == 3 else (*spec.size, 1), int)


def _draw_centre(subject: CachedSubject, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    fg = subject.foreground if spec.foreground else None
    if fg is not None and len(fg):
        return fg[rng.integers(len(fg))].astype(np.float64)
    return rng.uniform(0, np.asarray(subject.shape, np.float64) - 1)


def _cut(
    image: np.ndarray,
    affine: np.ndarray,
    centre: np.ndarray,
    src_shape: np.ndarray,
    out_shape: np.ndarray,
    pad: float,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cut_view` on an image and its affine; writes into ``out`` when given."""
    start = np.round(centre - (src_shape - 1) / 2.0).astype(int)
    resize = bool(np.any(src_shape != out_shape))
    box = _read_box(image, start, src_shape, pad, None if resize else out)
    box_affine = geometry.crop_affine(affine, start)
    if resize:
        t = torch.from_numpy(box)[None]
        box = F.interpolate(t, size=tuple(int(s) for s in out_shape), mode="trilinear")[0].numpy()
        box_affine = geometry.resized_affine(box_affine, src_shape, out_shape)
        if out is not None:
            out[...] = box
            box = out
    return box, box_affine


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
    return _cut(subject.image, subject.affine, centre, src_shape, out_shape, pad)


def sample_views(
    subject: CachedSubject, spec: ViewSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Located views of one subject: images ``[V, C, *size]`` and affines ``[V, 4, 4]``.

    Each view is copied once, straight from the memory map into the output array (no
    per-view temporaries or final stack when it is not resampled or augmented).
    """
    out_shape = _box_shape(spec)
    image, affine = subject.image, subject.affine
    channels: list[int] | None = None
    if spec.modality_per_view:
        present = np.flatnonzero(subject.present)
        channels = [int(c) for c in rng.permutation(present if len(present) else [0])]
        if spec.cross_modality < 1.0 and rng.random() >= spec.cross_modality:
            channels = channels[:1]  # this sample's views all show one modality
    n_channels = 1 if channels else image.shape[0]
    images = np.empty((spec.num_views, n_channels, *spec.size), np.float32)
    affines = np.empty((spec.num_views, 4, 4), np.float64)
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
                geometry.crop_affine(affine, start0),
                first[1],
                geometry.crop_affine(affine, start),
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
        dst = images[v] if len(spec.size) == 3 else images[v][..., None]
        src = image
        if channels:
            c = channels[v % len(channels)]
            src = image[c : c + 1]
        if spec.intensity is None:
            _, affines[v] = _cut(src, affine, centre, src_shape, out_shape, spec.pad_value, dst)
        else:
            img, affines[v] = _cut(src, affine, centre, src_shape, out_shape, spec.pad_value)
            dst[...] = spec.intensity.apply(img, rng)
    return images, affines


def modality_mask(subject: CachedSubject, spec: ViewSpec) -> np.ndarray:
    """Which input channels of a sample hold a modality: ``subject.present``, or one channel
    with ``spec.modality_per_view``."""
    return np.ones(1, bool) if spec.modality_per_view else subject.present.copy()


def augment_batch(batch: dict[str, Any], intensity: IntensityAugment | None) -> dict[str, Any]:
    """``batch["image"]`` through :meth:`IntensityAugment.apply_batch` (nothing without
    ``intensity``), seeded from the batch's per-sample seeds: the views replay with their
    samples whatever the loader (workers or not) and across a resume."""
    if intensity is None:
        return batch
    seeds = batch.get("seed")
    values = seeds.reshape(-1).tolist() if isinstance(seeds, torch.Tensor) else list(seeds or [0])
    state = np.random.SeedSequence([int(v) % 2**63 for v in values] + [_AUGMENT])
    batch["image"] = intensity.apply_batch(batch["image"], int(state.generate_state(1)[0]))
    return batch


_AUGMENT = 0x617567  # keeps the augmentation's stream apart from the objectives' (same seeds)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample integer seed from ``(seed, epoch, index)``: objectives seed their own
    random choices from it (``batch["seed"]``), so they replay with the sample."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)[0])


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
        epoch, i = divmod(int(index), self.samples_per_epoch)
        return {
            "image": torch.from_numpy(images),
            "affine": torch.from_numpy(affines),
            "modality_mask": torch.from_numpy(modality_mask(subject, self.spec)),
            "subject": sid,
            "seed": torch.tensor(sample_seed(self.seed, epoch, i)),
        }


_RECEIVED: dict[int, dict[int, torch.Tensor]] = {}
"""Ring buffers received in this (main) process, per worker pid, kept alive so that torch maps
each one once; dropped when their worker has exited."""


def _unpack_ring_batch(
    batch: dict[str, Any], ring: dict[str, torch.Tensor], pid: int
) -> dict[str, Any]:
    """Runs in the process that receives a batch: private copies of the ring's tensors."""
    for other in [p for p in _RECEIVED if p != pid and not pid_alive(p)]:
        del _RECEIVED[other]
    kept = _RECEIVED.setdefault(pid, {})
    for key, buf in ring.items():
        kept[buf.untyped_storage().data_ptr()] = buf
        batch[key] = buf.clone()
    return batch


class _RingBatch:
    def __init__(self, batch: dict[str, Any], ring: dict[str, torch.Tensor]) -> None:
        self.batch, self.ring = batch, ring

    def __reduce__(self) -> tuple:
        return _unpack_ring_batch, (self.batch, self.ring, os.getpid())


class SharedRingCollate:
    """``collate_fn`` that sends worker batches through reused shared-memory buffers.

    PyTorch's default collate gives every batch of a worker process a fresh shared-memory
    block, and both processes then fault in every page of it: for 8 MB batches that costs
    more than cutting the crops (``benchmarks/crop_throughput.py``). Here each worker stacks
    its batch's tensors into one of a few buffers that it reuses; torch maps each buffer once
    in the main process, which copies the batch out as it receives it (so a batch stays valid
    however long it is kept). A buffer is reused after ``prefetch_factor * num_workers + 2``
    batches of its worker, more than the DataLoader ever leaves unreceived (it keeps at most
    ``prefetch_factor * num_workers`` tasks outstanding): pass the loader's
    ``prefetch_factor``. In the main process (``num_workers=0``) this is ``default_collate``.
    """

    def __init__(self, prefetch_factor: int = 2) -> None:
        self.prefetch_factor = prefetch_factor
        self._next = 0
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, samples: list[dict[str, Any]]) -> Any:
        info = get_worker_info()
        if info is None or not isinstance(samples[0], dict):
            return default_collate(samples)
        slot = self._next
        self._next = (slot + 1) % (self.prefetch_factor * info.num_workers + 2)
        batch: dict[str, Any] = {}
        ring: dict[str, torch.Tensor] = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            if not isinstance(values[0], torch.Tensor):
                batch[key] = default_collate(values)
                continue
            shape = (len(values), *values[0].shape)
            buf = self._buffers.get((key, slot))
            if buf is None or buf.shape != shape or buf.dtype != values[0].dtype:
                buf = torch.empty(shape, dtype=values[0].dtype).share_memory_()
                self._buffers[(key, slot)] = buf
            torch.stack(values, out=buf)
            ring[key] = buf
        return _RingBatch(batch, ring)


class EpochSampler(Sampler[int]):
    """Yields this rank's share of ``epoch * n + i`` for ``i`` in ``range(n)``.

    Lightning calls ``set_epoch``. With ``world_size > 1`` the epoch's indices are sharded as
    ``torch.utils.data.DistributedSampler(shuffle=False)`` does (padded by wrapping around,
    then every ``world_size``-th from ``rank``), so the trainer runs with
    ``use_distributed_sampler=False``. :meth:`resume` makes the next iteration of ``epoch``
    start after the ``position`` indices already consumed: a run killed mid-epoch replays
    exactly the samples an uninterrupted run would have drawn.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.n = n
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self._follow: tuple[Callable[[], int], int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def follow_steps(
        self,
        steps_done: Callable[[], int] | None,
        batch_size: int = 1,
        batches_per_epoch: int | None = None,
    ) -> None:
        """Take the epoch and the place in it from ``steps_done()`` (one batch of
        ``batch_size`` per step) when an iteration starts, ignoring :meth:`set_epoch`; step
        ``s`` then draws batch ``s % B`` of epoch ``s // B`` in every run, resumed or not.
        (After a resume at the end of an epoch, Lightning's loop can set the previous epoch
        again; found by the kill -9 test.) ``None`` stops following."""
        if steps_done is None:
            self._follow = None
            return
        per_epoch = -(-len(self) // batch_size) if batches_per_epoch is None else batches_per_epoch
        self._follow = (steps_done, batch_size, per_epoch)

    def resume(self, epoch: int, position: int) -> None:
        """Start the next iteration at ``epoch`` after ``position`` of this rank's indices."""
        self.epoch = epoch
        self._resume = (epoch, position)

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def indices(self, epoch: int) -> list[int]:
        """This rank's global indices of ``epoch``, in order."""
        order = list(range(self.n))
        total = len(self) * self.world_size
        while len(order) < total:  # pad like DistributedSampler: wrap around
            order += order[: total - len(order)]
        base = epoch * self.n
        return [base + i for i in order[self.rank : total : self.world_size]]

    def __iter__(self) -> Iterator[int]:
        if self._follow is not None:
            steps_done, batch_size, per_epoch = self._follow
            epoch, batches = divmod(int(steps_done()), per_epoch)
            self.epoch, self._resume = epoch, None
            return iter(self.indices(epoch)[batches * batch_size :])
        idx = self.indices(self.epoch)
        if self._resume is not None:
            epoch, position = self._resume
            self._resume = None
            if epoch == self.epoch:
                idx = idx[position:]
        return iter(idx)
