"""Matching speed and memory: ``match_points`` before and after issue 18, same embeddings.

A SAM-like target: random unit maps on the grid ``anatomap embed`` gives a 1 mm brain T1
(181 x 217 x 181 voxels: fine map at stride 2, coarse at stride 8, ``--dim`` 128 per head as
``configs/sam.yaml``'s ``objective.embed_dim``). The template holds the same maps 6, -4, 8 mm
away (shared tensors: one copy in memory), so every point has a planted match. Each
(implementation, number of points) runs in its own child process on fresh embeddings:

- "fresh" times one call on a target never matched before (the old matcher re-samples the
  coarse map on the fine grid on its first call, the new one builds its per-target state),
  "warm" the best of ``--repeat`` further calls on the same target;
- peak is the child's resident-set high-water mark during the fresh call (``VmHWM``, reset
  after the embeddings are built), and "+match" the part above the embeddings.

The old matcher is ``tests/test_match_speed.py``'s reference copy; it is skipped where its
``[points x 3 x 2197 x D]`` gathers would need more than ``--old-max-gb``. "same" compares
the new points with the old ones (identical / all) and the largest score difference. The new
matcher is also run on a fine map stored channels-last (``cl``), the layout ``match_points``
reads without a copy.

    python benchmarks/match_speed.py [--quick] [--points 10 264 1000] [--threads 2] [--write]

``--write`` replaces the ``match_speed`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
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
SHIFT = np.array([6.0, -4.0, 8.0])
BOX = 13**3  # fine voxels per candidate at the default radius (12 mm at 2 mm)


def _unit_map(gen: torch.Generator, dim: int, shape: tuple[int, ...], cl: bool) -> torch.Tensor:
    """Random unit vectors ``[dim, *shape]``, one slab at a time (peak memory = the map)."""
    out = torch.empty(*shape, dim).permute(3, 0, 1, 2) if cl else torch.empty(dim, *shape)
    for x in range(shape[0]):
        out[:, x] = F.normalize(torch.randn(dim, *shape[1:], generator=gen), dim=0)
    return out


def embeddings(shape: tuple[int, ...], dim: int, cl: bool = False):
    """Template and target ``DenseEmbedding`` sharing one pair of maps, ``SHIFT`` apart."""
    from anatomap import geometry
    from anatomap.infer.embed import DenseEmbedding

    g = torch.Generator().manual_seed(0)
    coarse = _unit_map(g, dim, tuple(math.ceil(n / 8) for n in shape), False)
    fine = _unit_map(g, dim, tuple(math.ceil(n / 2) for n in shape), cl)
    out = []
    for shift in (np.zeros(3), SHIFT):
        aff = np.eye(4)
        aff[:3, 3] = np.array([-90.0, -126.0, -72.0]) + shift
        fa, ca = geometry.feature_affine(aff, 2), geometry.feature_affine(aff, 8)
        out.append(DenseEmbedding(coarse, fine, ca, fa, image_shape=shape, image_affine=aff))
    return out


def points(n: int, shape: tuple[int, ...]) -> np.ndarray:
    from anatomap import geometry

    ijk = np.random.default_rng(0).uniform(10, np.asarray(shape) - 11, size=(n, 3))
    aff = np.eye(4)
    aff[:3, 3] = [-90.0, -126.0, -72.0]
    return geometry.voxel_to_world(aff, ijk)


def child(args: argparse.Namespace) -> None:
    """One (implementation, points) measurement; prints a JSON line, saves the matches."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl == "old":
        sys.path.insert(0, str(ROOT / "tests"))
        from test_match_speed import _reference_match_points as match
    else:
        from anatomap.infer.match import match_points as match
    shape = tuple(args.shape)
    template, target = embeddings(shape, args.dim, cl=args.impl == "new-cl")
    pts = points(args.n, shape)
    small = embeddings((24, 24, 24), args.dim)
    match(small[0], points(2, (24, 24, 24)), small[1])  # imports and first-call costs
    base = hwm_mb(reset=True)
    t0 = time.perf_counter()
    res = match(template, pts, target)
    fresh = time.perf_counter() - t0
    peak = hwm_mb()
    warm: list[float] = []
    for _ in range(args.repeat):
        if sum(warm) > 10:
            break
        t0 = time.perf_counter()
        match(template, pts, target)
        warm.append(time.perf_counter() - t0)
    np.savez(args.save, points=res.points_mm, scores=res.scores)
    info = {"fresh": fresh, "warm": min(warm, default=float("nan")), "peak_mb": peak}
    print(json.dumps({**info, "base_mb": base}))


def _run(impl: str, n: int, args: argparse.Namespace, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--n", str(n), "--save", str(save)]
    cmd += ["--shape", *map(str, args.shape), "--dim", str(args.dim), "--repeat", str(args.repeat)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{impl} {n}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(r: dict | None, key: str = "fresh") -> str:
    return "-" if r is None else f"{r[key]:.3f}"


def _mem(r: dict | None) -> str:
    return (
        "-"
        if r is None
        else f"{r['peak_mb'] / 1024:.2f} (+{(r['peak_mb'] - r['base_mb']) / 1024:.2f})"
    )


HEADERS = [
    "points",
    "old s (fresh)",
    "old s (warm)",
    "old peak GB (+match)",
    "new s (fresh)",
    "new s (warm)",
    "new peak GB (+match)",
    "new cl s (fresh)",
    "new cl peak GB (+match)",
    "speed-up (fresh)",
    "same points, max |d score|",
]


def _row(n: int, args: argparse.Namespace, tmp: Path) -> list[str]:
    """Old, new and new on channels-last maps for ``n`` points: one table row."""
    res: dict[str, dict | None] = {}
    saved: dict[str, Path] = {}
    old_gb = n * 3 * BOX * (2 * args.dim * 4 + 100) / 2**30 + 1.0
    for impl in ("old", "new", "new-cl"):
        if impl == "old" and old_gb > args.old_max_gb:
            res[impl] = None
            continue
        saved[impl] = tmp / f"{impl}_{n}.npz"
        res[impl] = _run(impl, n, args, saved[impl])
        print(f"{impl:6s} {n:>7} points: {res[impl]}", file=sys.stderr, flush=True)
    new_res, cl_res = (np.load(saved[i]) for i in ("new", "new-cl"))
    if not np.array_equal(new_res["points"], cl_res["points"]):
        print(f"warning: {n} points: channels-last maps matched otherwise", file=sys.stderr)
    same = "-"
    if res["old"] is not None:
        a = np.load(saved["old"])
        equal = int(np.sum(np.all(a["points"] == new_res["points"], axis=1)))
        same = f"{equal}/{n}, {np.abs(a['scores'] - new_res['scores']).max():.1e}"
    old, new, cl = res["old"], res["new"], res["new-cl"]
    assert new is not None
    speed = f"{old['fresh'] / new['fresh']:.0f}x" if old else f"(old: ~{old_gb:.0f} GB)"
    cells = [_cell(old), _cell(old, "warm"), _mem(old), _cell(new), _cell(new, "warm")]
    return [f"{n:,}", *cells, _mem(new), _cell(cl), _mem(cl), speed, same]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", type=int, nargs="+", default=None, help="numbers of points")
    ap.add_argument("--quick", action="store_true", help="10, 264, 10000 points, 1 warm call")
    ap.add_argument("--shape", type=int, nargs=3, default=[181, 217, 181], help="image voxels")
    ap.add_argument("--dim", type=int, default=128, help="embedding dimension per head")
    ap.add_argument("--repeat", type=int, default=3, help="warm calls (best counts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--old-max-gb", type=float, default=4.0, help="skip the old matcher above")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.impl = args.child
        return child(args)
    sizes = args.points or (
        [10, 264, 10_000] if args.quick else [10, 100, 264, 1000, 10_000, 100_000]
    )
    if args.quick:
        args.repeat = 1
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_row(n, args, Path(tmp)) for n in sizes]
    threads = args.threads or torch.get_num_threads()
    lines = [
        "### Point matching: `match_points` before and after issue 18",
        "",
        f"Target: random unit maps on a {'x'.join(map(str, args.shape))} image (fine stride 2, "
        f"coarse stride 8, {args.dim}-d), template = the same maps {SHIFT.tolist()} mm away; "
        f"3 candidates, 12 mm refinement radius. Threads: {threads}. Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(HEADERS, rows),
    ]
    publish("match_speed", lines, args.write)


if __name__ == "__main__":
    main()
