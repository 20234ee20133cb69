"""Loader overhead: training steps per second with the real loader against the same steps fed
from batches already in memory (ISImed and SAM on the CPU, packaged configs).

For each method: the encoder, objective and AdamW step of ``anatomap pretrain`` (forward,
backward, gradient clipping, optimiser, ``on_after_step``), fed (a) by the DataLoader that
``anatomap pretrain`` builds (``ViewDataModule``: the config's ``num_workers``, ``auto``
resolved as pretrain resolves it, the shared ring collate; the views' augmentation runs on
each batch after it is loaded) and (b) by ``--steps`` batches drawn beforehand and held in
memory. Rounds alternate (a) and (b); the best round of each counts. Overhead = 1 -
rate(a) / rate(b).

    python benchmarks/loader_overhead.py [--volumes 8] [--data DIR] [--methods isimed sam]
        [--steps 20] [--rounds 2] [--write]

``--write`` replaces the ``loader_overhead`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

from _common import command, demo_cache, machine, met, publish, table, trainee

from anatomap.data.sampler import augment_batch


def _time(step, batches) -> float:
    t0 = time.perf_counter()
    n = 0
    for batch in batches:
        step(batch)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--volumes", type=int, default=8, help="demo subjects (2 mm)")
    ap.add_argument("--data", default=None, help="folder for the demo + cache (reused)")
    ap.add_argument("--methods", nargs="+", default=["isimed", "sam"], help="packaged configs")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and feed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="override data.num_workers")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()

    rows, targets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_cache(args.data or tmp, args.volumes)
        for method in args.methods:
            over = [f"data.samples_per_epoch={10**6}"]
            if args.workers is not None:
                over.append(f"data.num_workers={args.workers}")
            t, loader = trainee(method, data.cache, over)
            intensity = t.module.objective.view_spec().intensity

            def step(batch: dict, t=t, intensity=intensity) -> None:  # type: ignore[no-untyped-def]
                t.step(augment_batch(dict(batch), intensity))  # after loading, as pretrain does

            it = iter(loader)  # persistent workers: one iterator for the whole measurement
            for batch in itertools.islice(it, args.warmup):
                step(batch)
            held = list(itertools.islice(it, args.steps))
            real, mem = [], []
            for _ in range(args.rounds):
                real.append(_time(step, itertools.islice(it, args.steps)))
                mem.append(_time(step, held))
            r, m = max(real), max(mem)
            overhead = 1.0 - r / m
            cfg = t.cfg
            views = t.module.objective.view_spec()
            print(f"{method}: loader {r:.2f} steps/s, in memory {m:.2f}", flush=True)
            rows.append(
                (
                    method,
                    f"{cfg.trainer.batch_size} x {views.num_views} x {views.size[0]}^3",
                    f"{loader.num_workers} ({cfg.data.num_workers})",
                    f"{r:.2f}",
                    f"{m:.2f}",
                    f"{1e3 / r:.0f} / {1e3 / m:.0f}",
                    f"{overhead:.1%}",
                )
            )
            targets.append(
                (f"{method}: loader < 10% of the step", f"{overhead:.1%}", met(0.10, overhead))
            )
            del it, loader
    lines = [
        "### Loader overhead: real loader against batches held in memory (CPU)",
        "",
        f"{args.volumes} demo volumes at 2 mm; packaged configs (model, crop sizes, batch, "
        f"`data.num_workers`); {args.steps} timed steps per round, best of {args.rounds} "
        f"rounds each, after {args.warmup} warm-up steps. Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(
            [
                "method",
                "volumes x views x crop",
                "workers (config)",
                "steps/s, real loader",
                "steps/s, in memory",
                "ms per step (real / memory)",
                "loader overhead",
            ],
            rows,
        ),
        "",
        *table(["target", "measured", "met"], targets, "lrl"),
        "",
    ]
    publish("loader_overhead", lines, args.write)


if __name__ == "__main__":
    main()
