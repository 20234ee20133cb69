"""Scaling: loader time per epoch and memory as the number of cached subjects grows.

For each ``--subjects`` count N, a demo cache of N subjects at 2 mm on disk (built once under
``--data`` and reused), then one epoch of N samples through the training loader
(``LocatedViewDataset`` + ``EpochSampler`` + the shared ring collate, ISImed's 16 crops of
32^3 per volume by default, ``--workers`` workers), timed twice (the second epoch reads pages
the first one left in the page cache). Memory is sampled every 20 ms over the loader process
and its workers: anonymous memory (what the loader allocates, independent of the page cache)
and the resident set (which also counts mapped cache pages, so it follows the page cache).

Demo generation costs about 1 s per subject and caching about 0.5 s on 2 CPU cores; for
1000 subjects ``--real 100`` generates and caches 100 subjects and writes the others as
copies of their cached files (distinct files, so disk and page-cache use grow with N;
10,000 subjects take about 14 GB). ``--link`` makes them hard links instead (distinct names
and memory maps, one inode per generated subject): what is then measured is the loader's
own cost per subject (index, memory maps, file descriptors), not the page cache. The last
column is the most file descriptors open in any one process: the cache keeps at most a
bounded number of memory maps open (``anatomap.data.mmaps``), whatever N.

    python benchmarks/scaling.py --data /tmp/scaling [--subjects 10 100 1000 10000]
        [--real 100] [--link] [--workers 2] [--write]

Short run (a minute or two): ``--subjects 10 100 --real 10 --views 4``.

``--write`` replaces the ``scaling`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import TreeMemory, command, demo_cache, disk_mb, machine, publish, table
from torch.utils.data import DataLoader

from anatomap.data.cache import Cache
from anatomap.data.sampler import EpochSampler, LocatedViewDataset, SharedRingCollate, ViewSpec


def epoch_seconds(loader: DataLoader, sampler: EpochSampler, epoch: int) -> float:
    sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="folder for the demo caches (reused)")
    ap.add_argument("--subjects", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--real", type=int, default=None, help="generate at most this many")
    ap.add_argument("--link", action="store_true", help="hard links instead of copies")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()

    rows = []
    spec = ViewSpec(args.views, (args.size,) * 3)
    for n in args.subjects:
        t0 = time.perf_counter()
        data = demo_cache(Path(args.data), n, real=args.real, link=args.link)
        built = time.perf_counter() - t0
        if data.seconds:
            print(f"N={n}: built in {built:.0f} s {data.seconds}", flush=True)
        cache = Cache(data.cache)
        ds = LocatedViewDataset(cache, cache.subjects, spec, samples_per_epoch=n, seed=0)
        sampler = EpochSampler(len(ds))
        loader = DataLoader(
            ds,
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            collate_fn=SharedRingCollate(),
        )
        with TreeMemory() as mem:
            first = epoch_seconds(loader, sampler, 0)
            second = epoch_seconds(loader, sampler, 1)
        del loader
        rows.append(
            (
                n,
                f"{disk_mb(data.cache, 'image.npy'):,.0f}",
                f"{first:.2f}",
                f"{second:.2f}",
                f"{second / n * 1e3:.1f}",
                f"{mem.anon:,.0f}",
                f"{mem.rss:,.0f}",
                f"{mem.fds:,}",
            )
        )
        print(" | ".join(map(str, rows[-1])), flush=True)
    how = "hard links to" if args.link else "copies of"
    gen = f"; subjects beyond the first {args.real} are {how} cached files" if args.real else ""
    lines = [
        "### Scaling: loader epoch time and memory against the number of subjects",
        "",
        f"Demo subjects at 2 mm cached on disk (float16){gen}; one epoch = one sample per "
        f"subject ({args.views} crops of {args.size}^3), batch {args.batch_size}, "
        f"{args.workers} workers; memory: peaks over the loader process and its workers. "
        f"Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(
            [
                "subjects",
                "cache images on disk (MB)",
                "epoch 1 (s)",
                "epoch 2 (s)",
                "ms per sample (epoch 2)",
                "peak anonymous memory (MB)",
                "peak RSS incl. mapped cache pages (MB)",
                "most open files in one process",
            ],
            rows,
        ),
        "",
    ]
    publish("scaling", lines, args.write)


if __name__ == "__main__":
    main()
