"""Cache build throughput: subjects per minute of ``anatomap data cache`` with 1 and 2 workers.

Two data sets, generated once under ``--data`` and reused:

- the demo cohort (``--demo`` subjects, 2 mm MNI-like T1w heads, ``--preset mri``,
  ``--spacing 2``);
- CT-sized volumes (``--ct`` of them, ``--ct-shape`` voxels, 0.7 x 0.7 x 1.0 mm, int16
  ``.nii.gz`` as scanners export them): a trunk phantom (``anatomap.data.phantoms``)
  upsampled to that size with noise, cached with ``--preset ct --spacing 1.5``.

For every ``--workers`` count the cache is built from scratch into a fresh folder, through
``build_cache`` exactly as ``anatomap data cache --workers N`` runs it (worker start-up
included), and timed. Subjects per minute = subjects / seconds x 60.

    python benchmarks/cache_build.py --data /tmp/cache_bench [--demo 8] [--ct 2]
        [--ct-shape 512 512 300] [--workers 1 2] [--write]

The default run (4 demo subjects, 2 CT volumes of 512x512x300) takes a few minutes on
2 cores. ``--write`` replaces the ``cache_build`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from _common import command, machine, publish, table
from scipy import ndimage as ndi

from anatomap.data.cache import build_cache
from anatomap.data.manifest import index_directory, write_manifest

CT_SPACING = (0.7, 0.7, 1.0)


def demo_manifest(root: Path, n: int) -> Path:
    from anatomap.data.demo import build_demo

    manifest = root / f"demo_{n}.jsonl"
    if not manifest.is_file():
        build_demo(root / f"demo_{n}", n_subjects=n, n_heldout=0, spacing=2.0, progress=False)
        write_manifest(index_directory(root / f"demo_{n}"), manifest)
    return manifest


def ct_volume(path: Path, shape: tuple[int, int, int], seed: int) -> None:
    """A CT-like int16 volume of ``shape`` voxels (phantom at 1/4 size, upsampled)."""
    from anatomap.data.phantoms import ct_phantom

    small = tuple(max(8, n // 4) for n in shape)
    coarse = [s * n / m for s, n, m in zip(CT_SPACING, shape, small, strict=True)]
    vol = ct_phantom(small, spacing=coarse, seed=seed, orientation="RAS", noise_hu=0.0)
    zoom = [n / m for n, m in zip(shape, small, strict=True)]
    big = ndi.zoom(vol.array, zoom, order=1)[: shape[0], : shape[1], : shape[2]]
    big += np.random.default_rng(seed).normal(0, 15, big.shape).astype(np.float32)
    affine = vol.affine.copy()
    affine[:3, :3] = np.diag(CT_SPACING)
    img = nib.Nifti1Image(np.clip(big, -1024, 3071).astype(np.int16), affine)
    nib.save(img, str(path))


def ct_manifest(root: Path, n: int, shape: tuple[int, int, int]) -> Path:
    folder = root / f"ct_{n}_{'x'.join(map(str, shape))}"
    manifest = folder.with_suffix(".jsonl")
    if not manifest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = folder / f"case{i:03d}_CT.nii.gz"
            if not path.is_file():
                t0 = time.perf_counter()
                ct_volume(path, shape, i)
                print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        write_manifest(index_directory(folder), manifest)
    return manifest


def timed_build(manifest: Path, out: Path, workers: int, **kw: object) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = build_cache(manifest, out, progress=False, workers=workers, **kw)
    seconds = time.perf_counter() - t0
    if res.problems:
        raise SystemExit(f"cache build rejected subjects: {res.problems}")
    return seconds, res.built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="folder for the generated data (reused)")
    ap.add_argument("--demo", type=int, default=4, help="demo subjects (0: none)")
    ap.add_argument("--ct", type=int, default=2, help="CT-sized volumes (0: none)")
    ap.add_argument("--ct-shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    shape = tuple(args.ct_shape)
    sets = []
    if args.demo:
        sets.append(("demo (T1w, 2 mm)", demo_manifest(root, args.demo), "mri", 2.0))
    if args.ct:
        name = f"CT {'x'.join(map(str, shape))} int16 .nii.gz"
        sets.append((name, ct_manifest(root, args.ct, shape), "ct", 1.5))
    rows = []
    for name, manifest, preset, spacing in sets:
        base = None
        for w in args.workers:
            out = root / f"cache_{manifest.stem}_w{w}"
            seconds, n = timed_build(manifest, out, w, preset=preset, spacing=spacing)
            base = base or seconds
            rows.append(
                (name, n, w, f"{seconds:.1f}", f"{n / seconds * 60:.1f}", f"{base / seconds:.2f}x")
            )
            print(" | ".join(map(str, rows[-1])), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    lines = [
        "### Cache build: subjects per minute against workers",
        "",
        "`build_cache` (what `anatomap data cache --workers N` runs) from scratch into a fresh "
        "folder, worker start-up included. Demo: `--preset mri --spacing 2`; CT: phantom "
        "trunks upsampled to CT size (0.7 x 0.7 x 1.0 mm, int16 `.nii.gz`), `--preset ct "
        f"--spacing 1.5`. Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(["data", "subjects", "workers", "seconds", "subjects/min", "speed-up"], rows),
        "",
    ]
    publish("cache_build", lines, args.write)


if __name__ == "__main__":
    main()
