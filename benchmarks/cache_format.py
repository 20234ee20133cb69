"""Why the cache stores memory-mapped ``.npy``: random-crop read time per storage format.

For the same preprocessed volumes, reads random 32^3 crops (the ISImed crop) from:
  - ``.npy`` float16 / float32 opened with ``np.load(mmap_mode="r")`` (the cache),
  - uncompressed ``.nii`` sliced through nibabel's array proxy (no full load),
  - ``.nii.gz`` loaded whole for each crop (what a load-then-crop pipeline does per sample),
  - arrays already in memory (the lower bound).
Prints a table; ``--write`` appends it to docs/benchmarks.md.

    python benchmarks/cache_format.py [--volumes 8] [--crops 400] [--write]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from anatomap.data.demo import build_demo
from anatomap.data.preprocess import PRESETS, preprocess
from anatomap.io import read_volume


def _crop(arr, start, size: int) -> np.ndarray:
    x, y, z = start
    return np.asarray(arr[x : x + size, y : y + size, z : z + size], dtype=np.float32)


def _time_reads(open_fn, paths: list[Path], shape: tuple[int, ...], crops: int, size: int) -> float:
    rng = np.random.default_rng(0)
    handles = [open_fn(p) for p in paths] if open_fn is not None else None
    t0 = time.perf_counter()
    for _ in range(crops):
        i = int(rng.integers(len(paths)))
        start = [int(rng.integers(0, n - size)) for n in shape]
        arr = handles[i] if handles is not None else nib.load(str(paths[i])).get_fdata()
        _crop(arr, start, size).sum()
    return (time.perf_counter() - t0) / crops * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--crops", type=int, default=400)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--spacing", type=float, default=1.0)
    ap.add_argument("--write", action="store_true", help="append the table to docs/benchmarks.md")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = build_demo(root / "demo", n_subjects=args.volumes, n_heldout=0, progress=False)
        vols = [
            preprocess(read_volume(p), args.spacing, PRESETS["mri"]) for p in info.images.values()
        ]
        # Crop from a common shape (the smallest), as the timing does not depend on content.
        shape = tuple(int(min(v.shape[k] for v in vols)) for k in range(3))
        arrays = [np.ascontiguousarray(v.array[: shape[0], : shape[1], : shape[2]]) for v in vols]
        files: dict[str, list[Path]] = {"f16": [], "f32": [], "nii": [], "niigz": []}
        for i, a in enumerate(arrays):
            for key, dtype in (("f16", np.float16), ("f32", np.float32)):
                p = root / f"{i}_{key}.npy"
                np.save(p, a.astype(dtype))
                files[key].append(p)
            for key, suffix in (("nii", ".nii"), ("niigz", ".nii.gz")):
                p = root / f"{i}{suffix}"
                nib.save(nib.Nifti1Image(a, vols[i].affine), str(p))
                files[key].append(p)
        n = args.crops
        rows = [
            (
                "in-memory numpy (lower bound)",
                _time_reads(lambda p: p, arrays, shape, n, args.size),
            ),
            (
                ".npy float16, mmap (anatomap cache)",
                _time_reads(lambda p: np.load(p, mmap_mode="r"), files["f16"], shape, n, args.size),
            ),
            (
                ".npy float32, mmap",
                _time_reads(lambda p: np.load(p, mmap_mode="r"), files["f32"], shape, n, args.size),
            ),
            (
                ".nii via nibabel proxy slicing",
                _time_reads(lambda p: nib.load(str(p)).dataobj, files["nii"], shape, n, args.size),
            ),
            (
                ".nii.gz, full load per crop",
                _time_reads(None, files["niigz"], shape, max(10, n // 20), args.size),
            ),
        ]
        disk = {k: sum(p.stat().st_size for p in v) / 1e6 for k, v in files.items()}

    base = rows[1][1]
    lines = [
        f"### Cache format: random {args.size}^3 crop read time",
        "",
        f"{args.volumes} demo volumes at {args.spacing} mm ({'x'.join(map(str, shape))} voxels),"
        f" {args.crops} random crops; machine: {platform.machine()}, "
        f"{platform.processor() or platform.platform()}.",
        "Command: `python benchmarks/cache_format.py"
        f" --volumes {args.volumes} --crops {args.crops}`",
        "",
        "| storage | ms per crop | relative to cache |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.3f} | {ms / base:.2f}x |" for name, ms in rows]
    lines += [
        "",
        "Disk: " + ", ".join(f"{k} {v:.1f} MB" for k, v in disk.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        out = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        if not out.exists():
            out.write_text(
                "# Benchmarks\n\nEvery table here is printed by a script in "
                "`benchmarks/`; the command is under each title.\n\n"
            )
        with open(out, "a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
