"""GPU speed: training steps per second and peak memory per method with fp32 / bf16 /
channels-last / torch.compile, and embed + match seconds for a 1 mm CT-sized volume.

Training (one process per row, so each peak is its own): the packaged config of each method
(``--methods``; ``--override key=value`` changes it, e.g. ``trainer.batch_size=32``),
batches from a demo cache held on the device, the step of ``anatomap pretrain`` (forward,
backward, clipping, AdamW, ``on_after_step``; the views' augmentation on the device). Variants:
``fp32``; ``bf16`` (autocast, as ``trainer.precision: bf16-mixed``); ``bf16+channels_last``
(``trainer.channels_last``); ``bf16+compile`` (``trainer.compile``; the first step, which
compiles, is reported apart). Embedding: a SAM model of the packaged config (random weights:
speed only) over a ``--volume`` voxel image at 1 mm (default 384 x 384 x 320, a CT
field of view) with ``anatomap.infer.embed.embed_array`` (sliding windows, ``device``,
``precision``, ``channels_last``, ``compile``), then ``match_points`` of ``--points`` points
of that embedding against itself on the device.

One budget for everything (``--timeout`` seconds): rows are run cheapest first and those that
no longer fit are reported as not run. Without CUDA nothing is measured (GPU rows skipped);
``--dry-run`` runs every row on this machine's device (the CPU without CUDA) at a tiny size
(2 steps, 2 demo volumes, a 48^3 volume), to check the script end to end.

    python benchmarks/gpu.py [--methods isimed sam spatial_aware] [--steps 20] [--warmup 3]
        [--volume 384 384 320] [--points 200] [--timeout 540] [--dry-run] [--write]

``--write`` replaces the ``gpu`` block of docs/benchmarks.md (not with ``--dry-run``).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from _common import command, demo_cache, machine, peak_rss_mb, publish, sync, table, trainee

from anatomap.data.sampler import augment_batch

TRAIN_VARIANTS: dict[str, tuple[torch.dtype | None, list[str]]] = {
    "fp32": (None, []),
    "bf16": (torch.bfloat16, []),
    "bf16+channels_last": (torch.bfloat16, ["trainer.channels_last=true"]),
    "bf16+compile": (torch.bfloat16, ["trainer.compile=true"]),
}
EMBED_VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+compile": {"precision": "bf16", "compile": True},
}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def train_row(method: str, variant: str, cache: str, steps: int, warmup: int, over: list) -> dict:
    """Runs in a child process: one method and variant."""
    device = _device()
    autocast, switches = TRAIN_VARIANTS[variant]
    base = ["data.num_workers=0", "data.samples_per_epoch=10000", *over, *switches]
    t, loader = trainee(method, cache, base, device, autocast=autocast)
    intensity = t.module.objective.view_spec().intensity
    held = []
    for batch in itertools.islice(iter(loader), 4):
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        held.append(moved)

    def step(batch: dict) -> None:
        t.step(augment_batch(dict(batch), intensity))

    t0 = time.perf_counter()
    step(held[0])  # compiles, when asked
    sync()
    first = time.perf_counter() - t0
    for batch in itertools.islice(itertools.cycle(held), warmup):
        step(batch)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(held), steps):
        step(batch)
    sync()
    rate = steps / (time.perf_counter() - t0)
    spec = t.module.objective.view_spec()
    b = t.cfg.trainer.batch_size
    return {
        "steps_per_s": rate,
        "views": f"{b} x {spec.num_views} x {'x'.join(map(str, spec.size))}",
        "peak_mb": _peak_mb(device),
        "first_step_s": first,
    }


def _call(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """``fn(*args, **kwargs)`` with the keywords ``fn`` does not take left out (named)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs), []
    dropped = [k for k in kwargs if k not in params]
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params}), dropped


def embed_row(variant: str, shape: list[int], points: int, window: int) -> dict:
    """Runs in a child process: embed a random 1 mm volume with a SAM model, then match."""
    from anatomap.config import config_path, load_config
    from anatomap.infer.embed import DenseModel, embed_array
    from anatomap.infer.match import match_points
    from anatomap.train.module import PretrainModule

    device = _device()
    cfg = load_config(config_path("sam"), ["data.cache=unused", "output=unused"])
    torch.manual_seed(0)
    module = PretrainModule(cfg, 1)
    model = DenseModel(module.encoder, module.objective)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, *shape), dtype=np.float32)
    affine = np.eye(4)
    opts = {"window": window, "device": device, **EMBED_VARIANTS[variant]}
    small = image[:, : 2 * window, : 2 * window, : 2 * window]
    _call(embed_array, model, small, affine, **opts)  # warm-up: kernels, compile
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    emb, dropped = _call(embed_array, model, image, affine, **opts)
    sync()
    embed_s = time.perf_counter() - t0
    lo = np.asarray(shape) * 0.2
    pts = lo + rng.uniform(size=(points, 3)) * np.asarray(shape) * 0.6  # world mm = voxels
    t0 = time.perf_counter()
    _, more = _call(match_points, emb, pts, emb, device=device)
    sync()
    return {
        "embed_s": embed_s,
        "match_s": time.perf_counter() - t0,
        "peak_mb": _peak_mb(device),
        "dropped": dropped + more,
    }


def _child(argv: list[str], deadline: float) -> dict | str:
    left = deadline - time.monotonic()
    if left < 5:
        return "not run: time budget spent"
    try:
        proc = subprocess.run(
            [sys.executable, __file__, *argv], capture_output=True, text=True, timeout=left
        )
    except subprocess.TimeoutExpired:
        return "not finished: time budget spent"
    if proc.returncode != 0:
        return "error: " + (proc.stderr.strip().splitlines() or ["failed"])[-1][:100]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_row(
    args: argparse.Namespace, cache: str, method: str, variant: str, deadline: float
) -> tuple:
    argv = ["--train-row", method, variant, cache, "--steps", str(args.steps)]
    argv += ["--warmup", str(args.warmup), *(f"--override={o}" for o in args.override)]
    r = _child(argv, deadline)
    if isinstance(r, str):
        return (method, variant, "", r, "", "")
    return (
        method,
        variant,
        r["views"],
        f"{r['steps_per_s']:.2f}",
        f"{r['peak_mb']:,.0f}",
        f"{r['first_step_s']:.1f}",
    )


def _embed_row(args: argparse.Namespace, variant: str, deadline: float) -> tuple:
    size = "x".join(map(str, args.volume))
    argv = ["--embed-row", variant, *map(str, args.volume), "--points", str(args.points)]
    r = _child([*argv, "--window", str(args.window)], deadline)
    if isinstance(r, str):
        return (variant, size, r, "", "")
    note = f" (options not taken: {', '.join(r['dropped'])})" if r["dropped"] else ""
    return (
        variant + note,
        size,
        f"{r['embed_s']:.2f}",
        f"{r['match_s']:.2f}",
        f"{r['peak_mb']:,.0f}",
    )


def _rows(args: argparse.Namespace, cache: str, deadline: float) -> tuple[list, list]:
    """Every row, cheapest first (the compiled ones last), each printed as it is done."""
    train: dict[tuple[str, str], tuple] = {}
    embed: dict[str, tuple] = {}
    for compiled in (False, True):
        for variant in [v for v in TRAIN_VARIANTS if ("compile" in v) == compiled]:
            for method in args.methods:
                train[method, variant] = _train_row(args, cache, method, variant, deadline)
                print(" | ".join(map(str, train[method, variant])), flush=True)
        for variant in [v for v in EMBED_VARIANTS if ("compile" in v) == compiled]:
            embed[variant] = _embed_row(args, variant, deadline)
            print(" | ".join(map(str, embed[variant])), flush=True)
    rows = [train[m, v] for m in args.methods for v in TRAIN_VARIANTS]
    return rows, [embed[v] for v in EMBED_VARIANTS]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", nargs="+", default=["isimed", "sam", "spatial_aware"])
    ap.add_argument("--override", action="append", default=[], help="config key=value")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--volumes", type=int, default=4, help="demo subjects the batches come from")
    ap.add_argument("--data", default=None, help="folder for the demo + cache (reused)")
    ap.add_argument("--volume", type=int, nargs=3, default=[384, 384, 320], help="voxels, 1 mm")
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=540, help="seconds for the whole run")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on this machine's device")
    ap.add_argument("--train-row", nargs=3, metavar=("METHOD", "VARIANT", "CACHE"))
    ap.add_argument("--embed-row", nargs=4, metavar=("VARIANT", "X", "Y", "Z"))
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    return ap


def main() -> None:
    args = _parser().parse_args()
    if args.train_row:
        method, variant, cache = args.train_row
        over = list(args.override)
        print(json.dumps(train_row(method, variant, cache, args.steps, args.warmup, over)))
        return
    if args.embed_row:
        variant, *shape = args.embed_row
        size = [int(s) for s in shape]
        print(json.dumps(embed_row(variant, size, args.points, args.window)))
        return
    if args.dry_run and args.write:
        raise SystemExit("gpu.py: --dry-run measures nothing worth writing; drop --write")
    if args.dry_run:
        args.steps, args.warmup, args.volumes = 2, 1, 2
        args.volume, args.points, args.window = [48, 48, 48], 20, 32
    gpu = torch.cuda.is_available()
    deadline = time.monotonic() + args.timeout
    train, embed = [], []
    if gpu or args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            cache = str(demo_cache(args.data or tmp, args.volumes).cache)
            train, embed = _rows(args, cache, deadline)
    else:
        print("no CUDA device: nothing measured (GPU rows skipped); --dry-run checks the script")
    publish("gpu", _lines(args, gpu, train, embed), args.write)


def _lines(args: argparse.Namespace, gpu: bool, train: list, embed: list) -> list[str]:
    lines = ["### GPU: training steps, peak memory, embed + match", ""]
    where = "GPU" if gpu else "CPU (dry run: tiny sizes, not GPU figures)"
    if not (gpu or args.dry_run):
        return [
            *lines,
            f"Not run: no CUDA device on the machine that ran it. Machine: {machine()}.",
            f"Command to run on a GPU: `{command()}`",
            "",
        ]
    over = f" (overrides: {', '.join(args.override)})" if args.override else ""
    size = "x".join(map(str, args.volume))
    return [
        *lines,
        f"On the {where}. Training: packaged configs{over}, batches from {args.volumes} demo "
        f"volumes held on the device, {args.steps} timed steps after {args.warmup} (and the "
        f"first step, timed apart); one process per row. Embedding: a SAM model of the "
        f"packaged config (random weights), a {size} voxel volume at 1 mm, {args.window}^3 "
        f"windows; match: {args.points} points against the same embedding. Budget "
        f"{args.timeout:.0f} s. Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(
            ["method", "variant", "views", "steps/s", "peak memory (MB)", "first step (s)"],
            train,
            "lllrrr",
        ),
        "",
        *table(
            ["embedding", "volume (1 mm voxels)", "embed (s)", "match (s)", "peak memory (MB)"],
            embed,
            "llrrr",
        ),
        "",
    ]


if __name__ == "__main__":
    main()
