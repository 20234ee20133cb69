"""Training-step throughput and memory per method and encoder, at the default crop sizes.

For every packaged method config (``--methods``) and encoder (``--encoders``): the step of
``anatomap pretrain`` (forward, backward, clipping, AdamW, ``on_after_step``) on real batches
from a demo cache, held in memory (the loader is measured by ``loader_overhead.py``). Each
setting runs in its own process, so its peak memory is its own: peak RSS on the CPU; on a
GPU, peak allocated device memory. On a GPU the variants are fp32, bf16 autocast, bf16 +
channels-last-3d (``trainer.channels_last``), and (``--compile``) bf16 + ``torch.compile`` of
the encoder (``trainer.compile``), each measured; without CUDA only the CPU fp32 row is run
and the GPU variants are reported as skipped (``--cpu-variants`` adds fp32 + channels-last-3d
and fp32 + ``torch.compile`` rows on a CPU). The views' intensity augmentation is part of
the step (``augment_batch`` on the device), as in ``anatomap pretrain``.

    python benchmarks/step_throughput.py [--methods isimed sam spatial_aware]
        [--encoders small_cnn resnet segresnet swinunetr] [--steps 10] [--compile]
        [--cpu-variants] [--write]

``--write`` replaces the ``step_throughput`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time

import torch
from _common import command, demo_cache, machine, peak_rss_mb, publish, sync, table, trainee

from anatomap.data.sampler import augment_batch

VARIANTS: dict[str, tuple[dict, list[str]]] = {  # autocast, config switches of pretrain
    "fp32": ({}, []),
    "bf16": ({"autocast": torch.bfloat16}, []),
    "bf16+channels_last_3d": ({"autocast": torch.bfloat16}, ["trainer.channels_last=true"]),
    "bf16+compile": ({"autocast": torch.bfloat16}, ["trainer.compile=true"]),
    "fp32+channels_last_3d": ({}, ["trainer.channels_last=true"]),
    "fp32+compile": ({}, ["trainer.compile=true"]),
}


def one(method: str, encoder: str, variant: str, cache: str, steps: int, warmup: int) -> dict:
    """Runs in a child process: samples/s and peak memory of one setting."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast, switches = VARIANTS[variant]
    over = [f"model.name={encoder}", "data.num_workers=0", "data.samples_per_epoch=10000"]
    t, loader = trainee(method, cache, over + switches, device, **autocast)
    batches = list(itertools.islice(iter(loader), 4))
    intensity = t.module.objective.view_spec().intensity

    def step(batch: dict) -> None:
        # the views' augmentation runs on the batch once it is on its device, as in pretrain
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        t.step(augment_batch(batch, intensity))

    for batch in itertools.islice(itertools.cycle(batches), warmup):
        step(batch)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        step(batch)
    sync()
    dt = time.perf_counter() - t0
    spec = t.module.objective.view_spec()
    b = t.cfg.trainer.batch_size
    out = {
        "volumes_per_s": steps * b / dt,
        "crops_per_s": steps * b * spec.num_views / dt,
        "views": f"{b} x {spec.num_views} x {'x'.join(map(str, spec.size))}",
        "peak_rss_mb": peak_rss_mb(),
    }
    if device == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", nargs="+", default=["isimed", "sam", "spatial_aware"])
    ap.add_argument(
        "--encoders", nargs="+", default=["small_cnn", "resnet", "segresnet", "swinunetr"]
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--volumes", type=int, default=4, help="demo subjects the batches come from")
    ap.add_argument("--data", default=None, help="folder for the demo + cache (reused)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (GPU)")
    ap.add_argument(
        "--cpu-variants",
        action="store_true",
        help="on a CPU, also fp32 + channels-last-3d and fp32 + torch.compile",
    )
    ap.add_argument("--one", nargs=4, metavar=("METHOD", "ENCODER", "VARIANT", "CACHE"))
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, steps=args.steps, warmup=args.warmup)))
        return

    gpu = torch.cuda.is_available()
    variants = ["fp32"]
    if gpu:
        variants += ["bf16", "bf16+channels_last_3d"] + (["bf16+compile"] if args.compile else [])
    else:
        print("no CUDA device: GPU variants (bf16, channels-last-3d, compile) skipped")
        if args.cpu_variants:
            variants += ["fp32+channels_last_3d", "fp32+compile"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(demo_cache(args.data or tmp, args.volumes).cache)
        for method, encoder, variant in itertools.product(args.methods, args.encoders, variants):
            cmd = [sys.executable, __file__, "--one", method, encoder, variant, cache]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["failed"])[-1][:80]
                rows.append((method, encoder, variant, "", "", "", f"error: {err}"))
                print(f"{method} {encoder} {variant}: {err}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            mem = f"{r['peak_device_mb']:,.0f}" if gpu else f"{r['peak_rss_mb']:,.0f}"
            rows.append(
                (
                    method,
                    encoder,
                    variant,
                    r["views"],
                    f"{r['volumes_per_s']:.2f}",
                    f"{r['crops_per_s']:.1f}",
                    mem,
                )
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
    mem_col = "peak device memory (MB)" if gpu else "peak RSS (MB)"
    lines = [
        "### Training-step throughput and memory per method and encoder",
        "",
        f"Packaged configs (default crop sizes and batch), batches from {args.volumes} demo "
        f"volumes held in memory, {args.steps} timed steps after {args.warmup}; one process "
        f"per row. Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(
            ["method", "encoder", "variant", "views", "volumes/s", "crops/s", mem_col],
            rows,
            "llllrrr",
        ),
        "",
    ]
    if not gpu:
        lines += [
            "GPU variants (bf16 autocast, channels-last-3d, torch.compile): not run, no "
            "CUDA device on this machine.",
            "",
        ]
    publish("step_throughput", lines, args.write)


if __name__ == "__main__":
    main()
