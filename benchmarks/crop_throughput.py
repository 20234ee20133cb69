"""Located-crop throughput: anatomap's cache + sampler against MONAI, TorchIO and SimpleITK.

The same preprocessed demo volumes (anatomap's cache; the other libraries get them as
float32 arrays in memory, their fastest path), the same crops per volume, batch size and
number of DataLoader workers, in one run:

- anatomap: ``LocatedViewDataset`` (memory-mapped float16 cache, foreground centres) with
  ``EpochSampler`` and ``SharedRingCollate``, as ``anatomap pretrain`` loads it;
- MONAI: ``CacheDataset`` + ``RandSpatialCropSamplesd`` (MetaTensors: crops carry their
  affine) with ``monai.data.DataLoader`` and ``list_data_collate``;
- TorchIO: ``Queue`` + ``UniformSampler`` (patches carry their location) and
  ``SubjectsLoader``; the queue's subject loading uses the same number of workers;
- SimpleITK: ``RegionOfInterest`` per crop (origin kept) in a torch ``Dataset``.

Each loader yields ``--batch-size`` volumes x N crops per batch; the timed batches follow
``--warmup`` batches (worker start-up). Also, on one core with no DataLoader: anatomap's
``sample_views`` against a plain NumPy copy of the same output bytes (the memory-bandwidth
bound for the bytes the sampler writes).

    python benchmarks/crop_throughput.py [--volumes 8] [--data DIR] [--workers 2]
        [--batch-size 4] [--batches 20] [--settings 2x64 16x32] [--write]

``--write`` replaces the ``crop_throughput`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from _common import command, demo_cache, fmt, machine, met, publish, rate, table
from torch.utils.data import DataLoader, Dataset, RandomSampler

from anatomap.data.cache import Cache
from anatomap.data.sampler import (
    EpochSampler,
    LocatedViewDataset,
    SharedRingCollate,
    ViewSpec,
    sample_views,
)


def _padded(image: np.ndarray, edge: int) -> np.ndarray:
    """``image`` [C, X, Y, Z] as float32, zero-padded at the end to at least ``edge`` per axis."""
    pad = [(0, 0)] + [(0, max(0, edge - n)) for n in image.shape[1:]]
    return np.ascontiguousarray(np.pad(np.asarray(image, np.float32), pad))


def anatomap_loader(cache: Cache, views: int, size: int, batch: int, workers: int, n: int):
    spec = ViewSpec(views, (size,) * 3)
    ds = LocatedViewDataset(cache, cache.subjects, spec, samples_per_epoch=n * batch, seed=0)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=EpochSampler(len(ds)),
        num_workers=workers,
        collate_fn=SharedRingCollate(),  # as ``anatomap pretrain`` loads
    )


def monai_loader(vols: list, views: int, size: int, batch: int, workers: int, n: int):
    from monai.data import CacheDataset, MetaTensor, list_data_collate
    from monai.data import DataLoader as MonaiLoader
    from monai.transforms import Compose, EnsureTyped, RandSpatialCropSamplesd

    data = [{"image": MetaTensor(torch.from_numpy(a), affine=torch.from_numpy(f))} for a, f in vols]
    transform = Compose(
        [
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=True),
            RandSpatialCropSamplesd(keys="image", roi_size=size, num_samples=views),
        ]
    )
    ds = CacheDataset(data, transform, cache_rate=1.0, progress=False)
    return MonaiLoader(
        ds,
        batch_size=batch,
        sampler=RandomSampler(ds, replacement=True, num_samples=n * batch),
        num_workers=workers,
        collate_fn=list_data_collate,
    )


def torchio_loader(vols: list, views: int, size: int, batch: int, workers: int, n: int):
    import torchio as tio

    subjects = [
        tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(a), affine=f)) for a, f in vols
    ]
    ds = tio.SubjectsDataset(subjects)
    queue = tio.Queue(
        ds,
        max_length=4 * batch * views,
        samples_per_volume=views,
        sampler=tio.UniformSampler(size),
        subject_sampler=RandomSampler(ds, replacement=True, num_samples=n * batch),
        num_workers=workers,
        shuffle_subjects=False,  # the random subject sampler shuffles
    )
    return tio.SubjectsLoader(queue, batch_size=batch * views, num_workers=0)


class SitkCrops(Dataset):
    """Random ``size``^3 crops of SimpleITK images (``RegionOfInterest`` keeps the origin)."""

    def __init__(self, vols: list, views: int, size: int, n: int) -> None:
        import SimpleITK as sitk

        from anatomap.io.writers import array_affine_to_sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        self.images = [[array_affine_to_sitk(ch, f) for ch in a] for a, f in vols]
        self.views, self.size, self.n = views, size, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        import SimpleITK as sitk

        rng = np.random.default_rng(index)
        chans = self.images[index % len(self.images)]
        shape = np.asarray(chans[0].GetSize())
        crops, origins = [], []
        for _ in range(self.views):
            start = [int(v) for v in rng.integers(0, shape - self.size + 1)]
            rois = [sitk.RegionOfInterest(img, [self.size] * 3, start) for img in chans]
            crops.append(np.stack([sitk.GetArrayFromImage(r).transpose(2, 1, 0) for r in rois]))
            origins.append(rois[0].GetOrigin())
        return {"image": torch.from_numpy(np.stack(crops)), "origin": torch.tensor(origins)}


def sitk_loader(vols: list, views: int, size: int, batch: int, workers: int, n: int):
    return DataLoader(
        SitkCrops(vols, views, size, n * batch), batch_size=batch, num_workers=workers
    )


def crops_per_second(loader: Iterable, warmup: int, batches: int) -> float:
    """Crops per second over ``batches`` batches after ``warmup`` ones (images counted by their
    leading dimensions: [B, V, ...] or [B*V, ...])."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    count = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        image = next(it)["image"]
        image = image["data"] if isinstance(image, dict) else image  # TorchIO: {"data": ...}
        count += int(np.prod(image.shape[: image.ndim - 4]))
    return count / (time.perf_counter() - t0)


def single_core(cache: Cache, views: int, size: int, seconds: float) -> tuple[float, float]:
    """Crops/s of ``sample_views`` in this process, and of a NumPy copy of the same bytes."""
    spec = ViewSpec(views, (size,) * 3)
    subjects = [cache[s] for s in cache.subjects]
    c = subjects[0].image.shape[0]
    for s in subjects:  # touch every page once: both rows then read from memory
        np.asarray(s.image).max()
    state = {"i": 0}

    def sample() -> int:
        state["i"] += 1
        sample_views(subjects[state["i"] % len(subjects)], spec, np.random.default_rng(state["i"]))
        return views

    src = np.random.default_rng(0).random((views, c, size, size, size), dtype=np.float32)
    dst = np.empty_like(src)

    def copy() -> int:
        np.copyto(dst, src)
        return views

    rate(sample, calls=5)
    return rate(sample, seconds), rate(copy, seconds)


LOADERS: dict[str, Callable] = {
    "monai": monai_loader,
    "torchio": torchio_loader,
    "simpleitk": sitk_loader,
}
NAMES = {
    "anatomap": "anatomap cache + LocatedViewDataset",
    "monai": "MONAI CacheDataset + RandSpatialCropSamplesd",
    "torchio": "TorchIO Queue + UniformSampler",
    "simpleitk": "SimpleITK RegionOfInterest",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--volumes", type=int, default=8, help="demo subjects (2 mm)")
    ap.add_argument("--data", default=None, help="folder for the demo + cache (reused)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="volumes per batch")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per loader")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settings", nargs="+", default=["2x64", "16x32"], help="VIEWSxSIZE")
    ap.add_argument("--others", nargs="*", default=list(LOADERS), choices=list(LOADERS))
    ap.add_argument("--seconds", type=float, default=2.0, help="per single-core measurement")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = demo_cache(args.data or tmp, args.volumes)
        cache = Cache(data.cache)
        # The other libraries crop inside the volume: pad every axis to the largest crop.
        edge = max(int(s.lower().split("x")[1]) for s in args.settings)
        vols = [(_padded(cache[s].image, edge), cache[s].affine) for s in cache.subjects]
        shapes = {cache[s].shape for s in cache.subjects}
        chans = vols[0][0].shape[0]
        n = args.warmup + args.batches
        lines = [
            "### Located-crop throughput: anatomap, MONAI, TorchIO, SimpleITK",
            "",
            f"{args.volumes} demo volumes at 2 mm ({len(shapes)} shapes, up to "
            f"{'x'.join(str(max(s[k] for s in shapes)) for k in range(3))} voxels, "
            f"{chans} channel), {args.batch_size} volumes per batch, {args.workers} DataLoader "
            f"workers for every library, {args.batches} timed batches after {args.warmup}. "
            "anatomap reads its float16 memory-mapped cache; the others hold the same volumes "
            f"as float32 in memory (zero-padded to at least {edge} voxels per axis). MB/s counts the float32 crops delivered. "
            f"Machine: {machine()}.",
            f"Command: `{command()}`",
            "",
        ]
        targets = []
        for setting in args.settings:
            views, size = (int(x) for x in setting.lower().split("x"))
            mb = size**3 * chans * 4 / 1e6
            rates = {"anatomap": 0.0}
            loader = anatomap_loader(cache, views, size, args.batch_size, args.workers, n)
            rates["anatomap"] = crops_per_second(loader, args.warmup, args.batches)
            print(f"{setting} anatomap: {rates['anatomap']:.0f} crops/s", flush=True)
            for name in args.others:
                loader = LOADERS[name](vols, views, size, args.batch_size, args.workers, n)
                rates[name] = crops_per_second(loader, args.warmup, args.batches)
                print(f"{setting} {name}: {rates[name]:.0f} crops/s", flush=True)
            one, bound = single_core(cache, views, size, args.seconds)
            rows = [
                (NAMES[k], fmt(r), fmt(r * mb), f"{rates['anatomap'] / r:.2f}x")
                for k, r in rates.items()
            ]
            rows += [
                ("anatomap `sample_views`, 1 core, no DataLoader", fmt(one), fmt(one * mb), ""),
                ("NumPy copy of the same bytes, 1 core (bound)", fmt(bound), fmt(bound * mb), ""),
            ]
            lines += [
                f"**{views} crops of {size}^3 per volume** ({args.batch_size * views} crops per "
                "batch)",
                "",
                *table(["loader", "crops/s", "MB/s", "anatomap speed-up"], rows),
                "",
            ]
            for k in args.others:
                ratio = rates["anatomap"] / rates[k]
                targets.append((f"{setting}: anatomap >= 3x {k}", f"{ratio:.2f}x", met(ratio, 3)))
            ratio = bound / one
            targets.append(
                (f"{setting}: within 2x of the copy bound", f"{ratio:.1f}x slower", met(2, ratio))
            )
        lines += [*table(["target", "measured", "met"], targets, "lrl"), ""]
    publish("crop_throughput", lines, args.write)


if __name__ == "__main__":
    main()
