"""Dense embedding of a large volume: time and peak memory of three sliding windows, side by side.

Every implementation embeds the same random volume with the same model, each in its own
child process (peak = the child's resident-set high-water mark ``VmHWM``, reset once the model
and the volume are built, so "+embed" is what the embedding itself adds):

- ``old``: the hand-rolled window before issue 18 (``tests/test_embed_speed.py``'s reference):
  two full-size float32 accumulators per level, normalised at the end (float32 maps);
- ``monai``: MONAI's ``SlidingWindowInferer`` (``mode="gaussian"``, ``sigma_scale=0.25`` as
  ours, the model's two outputs at their own resolutions) on the volume padded so that its
  windows sit on the stride grid, then normalised into float16 maps one slab at a time;
- ``new``: :func:`anatomap.infer.embed.embed_array` (streamed windows, float16 maps).

Model: the default SAM architecture (``configs/sam.yaml``: ``small_cnn`` encoder, FPN 32,
``--dim`` 128 per head; random weights: the cost does not depend on them); window 64, overlap
0.25, 2 windows per forward pass. "bound" is the new path's memory by formula: the float16
maps plus the float32 bands (one window deep) of both levels. With ``--compare`` the maps of
``old`` and ``monai`` are compared with ``new`` (smallest per-voxel cosine similarity).

    python benchmarks/embed_memory.py --size 256 256 256 --compare
    python benchmarks/embed_memory.py --size 512 512 300 --dim 32 --impls old monai new

``--write`` replaces the ``embed_memory`` block of docs/benchmarks.md (one block per
``--size``/``--dim``; run the commands in turn).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import command, hwm_mb, machine, publish, table

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("old", "monai", "new")


def _cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def build_model(dim: int):
    from anatomap.infer.embed import DenseModel
    from anatomap.models.encoders import EncoderSpec, build_encoder
    from anatomap.objectives.registry import get_objective, objective_config

    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 64))
    cfg = objective_config({"name": "sam", "embed_dim": dim})
    return DenseModel(enc, get_objective("sam")(cfg, enc))


def _grid(model, shape, window: int, overlap: float) -> tuple[int, int, list[int]]:
    m = model.max_stride
    window = max(m, (window // m) * m)
    step = max(m, int(window * (1 - overlap)) // m * m)
    padded = []
    for n in shape:
        count = 1 if n <= window else math.ceil((n - window) / step) + 1
        padded.append(max(window, (count - 1) * step + window))
    return window, step, padded


@torch.inference_mode()
def embed_monai(model, image: np.ndarray, window: int, overlap: float, batch_size: int):
    """Float16 coarse and fine maps through MONAI's ``SlidingWindowInferer``."""
    from monai.inferers import SlidingWindowInferer

    window, step, padded = _grid(model, image.shape[1:], window, overlap)
    vol = torch.zeros(1, image.shape[0], *padded)
    x, y, z = image.shape[1:]
    vol[0, :, :x, :y, :z] = torch.from_numpy(image)
    # MONAI's step is int(window * (1 - overlap)): a hair less overlap lands it on ``step``
    ov = max(0.0, (window - step) / window - 1e-9)
    inferer = SlidingWindowInferer(
        window, batch_size, ov, mode="gaussian", sigma_scale=0.25, progress=False
    )
    outs = inferer(vol, lambda w: tuple(model(w)))
    del vol
    maps = []
    for stride, full in zip(model.strides, outs, strict=True):
        keep = [math.ceil(n / stride) for n in image.shape[1:]]
        out = torch.empty(*keep, full.shape[1], dtype=torch.float16).movedim(-1, 0)
        for s in range(0, keep[0], 4):
            e = min(s + 4, keep[0])
            out[:, s:e] = F.normalize(full[0, :, s:e, : keep[1], : keep[2]], dim=0)
        maps.append(out)
    return maps


def child(args: argparse.Namespace) -> None:
    """One implementation: prints a JSON line (seconds, peaks), saves the maps if asked."""
    torch.set_num_threads(args.threads)
    model = build_model(args.dim)
    image = np.random.default_rng(0).random((1, *args.size), dtype=np.float32)
    small = np.random.default_rng(1).random((1, 64, 64, 64), dtype=np.float32)
    run = _impl(args.impl, model)
    run(small)  # imports and first-call costs
    base = hwm_mb(reset=True)
    t0, c0 = time.perf_counter(), _cpu_s()
    coarse, fine = run(image)
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = hwm_mb()
    if args.save:
        torch.save({"coarse": coarse.half(), "fine": fine.half()}, args.save)
    info = {"seconds": seconds, "cpu_s": cpu, "peak_mb": peak, "base_mb": base}
    print(json.dumps({**info, "fine": list(fine.shape), "coarse": list(coarse.shape)}))


def _impl(name: str, model):
    kw = {"window": 64, "overlap": 0.25, "batch_size": 2}
    if name == "old":
        sys.path.insert(0, str(ROOT / "tests"))
        from test_embed_speed import _reference_embed_array

        return lambda im: _reference_embed_array(model, im, **kw)
    if name == "monai":
        return lambda im: embed_monai(model, im, **kw)
    from anatomap.infer.embed import embed_array

    def new(im):
        emb = embed_array(model, im, np.eye(4), device="cpu", **kw)
        return emb.coarse, emb.fine

    return new


def bound_gb(shape: list[int], dim: int, fine_channels: int = 0) -> float:
    """The new path's maps (float16) and bands (float32, one window deep) at both levels."""
    model = build_model(dim)
    window, _, padded = _grid(model, shape, 64, 0.25)
    total = 0
    for stride in model.strides:
        keep = [math.ceil(n / stride) for n in shape]
        total += 2 * dim * math.prod(keep)  # the map
        total += 4 * (dim + 1) * (window // stride) * (padded[1] // stride) * (padded[2] // stride)
    return total / 2**30


def _run(impl: str, args: argparse.Namespace, save: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--size", *map(str, args.size)]
    cmd += ["--dim", str(args.dim), "--threads", str(args.threads)]
    cmd += ["--save", str(save)] if save else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{impl}: {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{impl:6s}: {res}", file=sys.stderr, flush=True)
    return res


def _min_cosine(a: Path, b: Path) -> str:
    x, y = torch.load(a), torch.load(b)
    cos = [
        F.cosine_similarity(x[k].float(), y[k].float(), dim=0).min().item()
        for k in ("coarse", "fine")
    ]
    return f"{cos[0]:.5f} / {cos[1]:.5f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, nargs=3, default=[256, 256, 256], help="volume voxels")
    ap.add_argument("--dim", type=int, default=128, help="embedding dimension per head")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--compare", action="store_true", help="cosine of old/monai vs new maps")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.impl = args.child
        return child(args)
    rows, load = [], os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        saved = {i: Path(tmp) / f"{i}.pt" if args.compare else None for i in args.impls}
        res = {i: _run(i, args, saved[i]) for i in args.impls}
        for i in args.impls:
            r = res[i]
            same = "-"
            if args.compare and i != "new" and "new" in res:
                same = _min_cosine(saved[i], saved["new"])  # type: ignore[arg-type]
            rows.append(
                [
                    i,
                    f"{r['seconds']:.1f}",
                    f"{r['cpu_s']:.1f}",
                    f"{r['peak_mb'] / 1024:.2f} (+{(r['peak_mb'] - r['base_mb']) / 1024:.2f})",
                    "float16" if i != "old" else "float32",
                    same,
                ]
            )
    size = "x".join(map(str, args.size))
    fine = res[args.impls[-1]]["fine"]
    lines = [
        f"### Dense embedding of a {size} volume: old, MONAI and streamed sliding windows",
        "",
        f"Default SAM architecture with {args.dim}-d heads (random weights), window 64, "
        f"overlap 0.25, 2 windows per forward pass; fine map {tuple(fine)} (stride 2). "
        f"Each implementation in its own process; {args.threads} threads; load average "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end. "
        f"Bound of the new path (float16 maps + float32 bands): "
        f"{bound_gb(args.size, args.dim):.2f} GB. Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(
            ["sliding window", "s", "CPU s", "peak RSS GB (+embed)", "maps", "min cosine vs new"],
            rows,
        ),
    ]
    publish(f"embed_memory_{size}_{args.dim}", lines, args.write)


if __name__ == "__main__":
    main()
