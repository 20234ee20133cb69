"""DataLoader workers: no duplicated random streams, same samples as a single process.

Every sample is seeded by its global index (``LocatedViewDataset.locate``), not by the worker
that draws it, so two workers can never replay each other's random stream, and the epoch's
samples do not depend on the number of workers (issue 8).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from anatomap.config import load_config
from anatomap.data.cache import Cache
from anatomap.data.sampler import (
    EpochSampler,
    IntensityAugment,
    LocatedViewDataset,
    SharedRingCollate,
    ViewSpec,
)
from anatomap.train.module import ViewDataModule

# Scale jitter, overlap rejection and per-view MONAI intensity augmentation: every random
# source of the sampler is exercised.
SPEC = ViewSpec(2, (8, 8, 8), scale=(0.8, 1.2), min_overlap=0.25, intensity=IntensityAugment())


def _epoch(loader: DataLoader) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    out = []
    for batch in loader:
        for b, sid in enumerate(batch["subject"]):
            out.append((sid, batch["image"][b], batch["affine"][b]))
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _collect(ds: LocatedViewDataset, workers: int, epoch: int) -> list:
    sampler = EpochSampler(len(ds))
    sampler.set_epoch(epoch)
    return _epoch(DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers))


def test_two_workers_match_one_process_and_never_repeat(tiny_cache: Path) -> None:
    cache = Cache(tiny_cache)
    ds = LocatedViewDataset(cache, cache.subjects, SPEC, samples_per_epoch=12, seed=1)
    serial, parallel = _collect(ds, 0, 0), _collect(ds, 2, 0)
    assert len(parallel) == 12
    for (s0, i0, a0), (s1, i1, a1) in zip(serial, parallel, strict=True):
        assert s0 == s1
        assert torch.equal(i0, i1) and torch.equal(a0, a1)
    # Every view of the epoch (image bytes and placement) is different from every other:
    # workers 0 and 1 do not share a stream, and neither do the two views of a sample.
    views = [(img[v], aff[v]) for _, img, aff in parallel for v in range(img.shape[0])]
    assert len({_digest(i) for i, _ in views}) == len(views)
    assert len({_digest(a) for _, a in views}) == len(views)
    # The next epoch draws new samples (with the same worker processes' seeds).
    following = _collect(ds, 2, 1)
    assert all(not torch.equal(a[2], b[2]) for a, b in zip(parallel, following, strict=True))


def test_training_loader_with_workers_is_deterministic(tiny_cache: Path, tmp_path: Path) -> None:
    """The loader ``anatomap pretrain`` builds gives the same batches with 0 and 2 workers."""

    def batches(workers: int) -> list:
        cfg = load_config(
            base={
                "data": {"cache": str(tiny_cache), "samples_per_epoch": 8, "num_workers": workers},
                "trainer": {"batch_size": 4, "seed": 3},
                "output": str(tmp_path / "run"),
            }
        )
        cache = Cache(tiny_cache)
        dm = ViewDataModule(cfg, cache, cache.subjects, SPEC)
        return _epoch(dm.train_dataloader())

    one, two = batches(0), batches(2)
    assert len(one) == len(two) == 8
    for (s0, i0, a0), (s1, i1, a1) in zip(one, two, strict=True):
        assert s0 == s1 and torch.equal(i0, i1) and torch.equal(a0, a1)
    assert len({_digest(i) for _, i, _ in two}) == len(two)


def test_ring_collate_batches_stay_valid_after_buffer_reuse(tiny_cache: Path) -> None:
    """Each worker reuses its shared buffers after 2 * 2 + 2 batches; batches kept by the
    caller are private copies, so 20 batches held at once still equal the serial ones."""
    cache = Cache(tiny_cache)
    ds = LocatedViewDataset(cache, cache.subjects, ViewSpec(2, (6, 6, 6)), 40, seed=2)

    def run(workers: int) -> list:
        loader = DataLoader(
            ds,
            batch_size=2,
            sampler=EpochSampler(len(ds)),
            num_workers=workers,
            collate_fn=SharedRingCollate(),
        )
        return list(loader)

    serial, parallel = run(0), run(2)
    assert len(parallel) == 20
    for a, b in zip(serial, parallel, strict=True):
        assert a["subject"] == b["subject"]
        for key in ("image", "affine", "modality_mask"):
            assert torch.equal(a[key], b[key])
        assert not b["image"].is_shared()  # copied out of the ring
