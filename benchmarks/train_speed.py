"""Training speed per method, before and after issue 18, measured side by side (CPU).

For each packaged method config (``--methods``), on a demo cache: training steps per second
(forward, backward, gradient clipping, AdamW, ``on_after_step``) fed (a) by the training
loader and (b) by the same number of batches drawn beforehand and held in memory; rounds
alternate (a) and (b), the best round of each counts; loader overhead = 1 - rate(a) / rate(b).
Two settings per method, each in its own process:

- **before**: the code as it was: SAM's loss as a Python loop over volumes x directions
  (``LegacySAM`` of tests/test_train_speed.py, kept for this comparison), ``data.num_workers: 2`` (the old packaged
  value), per-view MONAI intensity augmentation in the loader, glibc's default ``malloc``;
- **after**: the current code: batched SAM loss, ``data.num_workers`` from the packaged
  config (``auto``: in process or workers, whichever was faster when training started),
  the batch's augmentation after it is loaded (``ViewDataModule.on_after_batch_transfer``),
  freed memory kept (``anatomap.train.pretrain.reuse_freed_memory``).

Both use the torch thread count of an ordinary run (one per core). The speed-up is after /
before with the real loader, the number ``anatomap pretrain`` sees; the load average at the
start is printed, as other work on the machine changes every figure.

    python benchmarks/train_speed.py [--methods isimed sam spatial_aware simclr voco topo]
        [--volumes 8] [--data DIR] [--steps 20] [--rounds 2] [--write]

Short check (a few minutes on 2 cores): ``--methods isimed sam --steps 3 --rounds 1
--warmup 1``. ``--write`` replaces the ``train_speed`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import Trainee, command, demo_cache, machine, met, peak_rss_mb, publish, table

from anatomap.config import config_path, load_config
from anatomap.data.cache import Cache
from anatomap.objectives.sam import SAM
from anatomap.train.module import PretrainModule, ViewDataModule


def _legacy_sam() -> type:
    """SAM's loss before issue 18 (one loop over volumes x directions, every term per pair):
    ``tests/test_train_speed.py``'s ``LegacySAM``, the reference its equivalence test pins,
    loaded from that file so the benchmark times exactly the code the test checks."""
    path = Path(__file__).resolve().parents[1] / "tests" / "test_train_speed.py"
    spec = importlib.util.spec_from_file_location("_anatomap_train_speed_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LegacySAM


def _setting(method: str, setting: str, cache: str) -> tuple[Trainee, ViewDataModule, Any]:
    """The method's trainee, data module and loader as ``setting`` (before / after) has them."""
    before = setting == "before"
    if not before:
        from anatomap.train.pretrain import reuse_freed_memory

        reuse_freed_memory()
    over = [f"data.cache={cache}", "output=unused", f"data.samples_per_epoch={10**6}"]
    cfg = load_config(config_path(method), over + (["data.num_workers=2"] if before else []))
    c = Cache(cache)
    torch.manual_seed(0)
    module = PretrainModule(cfg, len(c.modalities))
    if before and isinstance(module.objective, SAM):
        module.objective.__class__ = _legacy_sam()  # same parameters, the old forward
    spec = module.objective.view_spec()
    dm = ViewDataModule(cfg, c, c.subjects, spec)
    if before:  # per-view augmentation in the loader, as the dataset did it
        dm.dataset.spec = spec
        dm.intensity = None
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.trainer.lr)
    t = Trainee(module, opt, cfg, torch.device("cpu"))
    return t, dm, dm.train_dataloader()


def _rate(step, batches) -> float:  # type: ignore[no-untyped-def]
    t0, n = time.perf_counter(), 0
    for batch in batches:
        step(batch)
        n += 1
    return n / (time.perf_counter() - t0)


def one(method: str, setting: str, cache: str, steps: int, warmup: int, rounds: int) -> dict:
    """Runs in a child process: steps/s with the loader and from memory."""
    t, dm, loader = _setting(method, setting, cache)

    def step(batch: dict) -> None:
        batch = dm.on_before_batch_transfer(dict(batch), 0)
        t.step(dm.on_after_batch_transfer(batch, 0))

    it = iter(loader)  # persistent workers: one iterator for the whole measurement
    for batch in itertools.islice(it, warmup):
        step(batch)
    held = list(itertools.islice(it, steps))
    real, mem = [], []
    for _ in range(rounds):
        real.append(_rate(step, itertools.islice(it, steps)))
        mem.append(_rate(step, held))
    spec = t.module.objective.view_spec()
    choice = dm.loader_choice or {}
    return {
        "real": max(real),
        "memory": max(mem),
        "workers": loader.num_workers,
        "auto": choice,
        "peak_rss_mb": peak_rss_mb(),
        "views": f"{t.cfg.trainer.batch_size} x {spec.num_views} x {spec.size[0]}^{len(spec.size)}",
    }


def _child(method: str, setting: str, cache: str, args: argparse.Namespace) -> dict | str:
    cmd = [sys.executable, __file__, "--one", method, setting, cache]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["failed"])[-1][:100]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loader(r: dict) -> str:
    auto = r["auto"]
    if not auto:
        return f"{r['workers']} workers"
    own, other = auto["in_process_batches_per_s"], auto["workers_batches_per_s"]
    n = r["workers"]
    picked = "in process" if not n else f"{n} worker{'s' if n > 1 else ''}"
    rates = f"{own:.0f} vs {other:.0f} b/s" if other is not None else f"{own:.0f} b/s"
    return f"auto: {picked} ({rates})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--methods", nargs="+", default=["isimed", "sam", "spatial_aware", "simclr", "voco", "topo"]
    )
    ap.add_argument("--volumes", type=int, default=8, help="demo subjects (2 mm)")
    ap.add_argument("--data", default=None, help="folder for the demo + cache (reused)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round and feed")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "SETTING", "CACHE"))
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.warmup, args.rounds)))
        return

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows, targets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(demo_cache(args.data or tmp, args.volumes).cache)
        for method in args.methods:
            before = _child(method, "before", cache, args)
            after = _child(method, "after", cache, args)
            if isinstance(before, str) or isinstance(after, str):
                err = before if isinstance(before, str) else after
                print(f"{method}: {err}", flush=True)
                rows.append((method, "", "", "", "", "", "", "", f"error: {err}", ""))
                continue
            over_b = 1 - before["real"] / before["memory"]
            over_a = 1 - after["real"] / after["memory"]
            speed = after["real"] / before["real"]
            rows.append(
                (
                    method,
                    after["views"],
                    f"{before['workers']} workers",
                    f"{before['real']:.2f} / {before['memory']:.2f}",
                    f"{over_b:.1%}",
                    _loader(after),
                    f"{after['real']:.2f} / {after['memory']:.2f}",
                    f"{over_a:.1%}",
                    f"{speed:.2f}x",
                    f"{before['peak_rss_mb']:,.0f} / {after['peak_rss_mb']:,.0f}",
                )
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
            if method in ("sam", "isimed"):
                targets.append((f"{method}: steps/s x1.5", f"{speed:.2f}x", met(speed, 1.5)))
            targets.append(
                (f"{method}: loader < 10% of the step", f"{over_a:.1%}", met(0.10, over_a))
            )
    lines = [
        "### Training speed per method: before and after issue 18 (CPU)",
        "",
        f"{args.volumes} demo volumes at 2 mm; packaged configs; steps/s with the training "
        f"loader / from batches held in memory, {args.steps} timed steps per round, best of "
        f"{args.rounds} rounds each, after {args.warmup} warm-up steps; one process per "
        "setting (peak RSS: the training process, workers not counted). Before: SAM's "
        "per-pair loss loop, 2 loader workers, per-view MONAI augmentation in the loader, "
        "default malloc. After: batched SAM loss, `data.num_workers` of the config, batched "
        "augmentation after loading, freed memory kept. Load average at the start: "
        f"{load:.2f}. Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(
            [
                "method",
                "volumes x views x crop",
                "before: loader",
                "before: steps/s (loader / memory)",
                "before: overhead",
                "after: loader",
                "after: steps/s (loader / memory)",
                "after: overhead",
                "speed-up (loader)",
                "peak RSS, MB (before / after)",
            ],
            rows,
            "llllrlrrrr",
        ),
        "",
        *table(["target", "measured", "met"], targets, "lrl"),
        "",
    ]
    publish("train_speed", lines, args.write)


if __name__ == "__main__":
    main()
