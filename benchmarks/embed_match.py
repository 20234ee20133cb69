"""Embed + match against image registration, seconds per target in one run (issue 18).

Template: the 1 mm MNI152 2009 T1 (nilearn's ``load_mni152_template(resolution=1)``,
197x233x189, offline) with the 264 Power et al. (2011) landmarks. Targets: the same T1 under
a random affine (rotation up to 8 deg, scale 0.92-1.08, shift up to 10 mm) and a smooth cubic
B-spline warp (3-5 mm peak), the demo cohort's exact subject <-> template map
(:func:`anatomap.data.demo.transforms.draw_subject`), resampled on a 181x217x181 grid at 1 mm
around the warped brain; the partial field of view keeps 60% of that grid along the
superior-inferior axis (the top). True landmarks: the template's through the exact map; errors
count those inside the target's field of view.

Every matcher gets the same pairs and all 264 points; seconds per target:

- the model (``--model``, default the shipped ``brain-mri``): the target's embedding (its
  recorded preprocessing, i.e. resampling the 1 mm scan to the model's 2 mm, then the sliding
  window) + ``match_points`` on a target never matched before (its per-target state
  included); the template is embedded once, not counted;
- SimpleITK affine, rigid+affine and affine+B-spline (:mod:`anatomap.eval.registration`,
  their defaults) on the 1 mm images: building the target image + registering + moving the
  points; the template image is built once.

Then points against time and peak memory of ``match_points`` on one target, 10 to 10^5
points (random voxels inside the template's brain), each count in its own child process:
"fresh" is the first call on the target (state built), "warm" a second call (made when the
first took under 10 s), peak the child's ``VmHWM`` above what it held with both embeddings
loaded.

    python benchmarks/embed_match.py [--quick] [--targets 3] [--threads 2] [--write]

``--quick``: one target per field of view. ``--part targets`` / ``--part points`` runs one
half (each a few minutes; on a shared machine, each in a quiet moment). ``--write`` replaces
the ``embed_match`` and ``embed_match_points`` blocks of docs/benchmarks.md.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import command, hwm_mb, machine, publish, table

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (181, 217, 181)
KEEP = 0.6  # partial field of view: this fraction of the grid along the S-I axis
SEED = 918_000
REGISTRATIONS = ("affine", "rigid+affine", "affine+bspline")


@dataclass
class Scan:
    image: np.ndarray  # float32 [X, Y, Z], 1 mm
    affine: np.ndarray
    truth_mm: np.ndarray  # [264, 3] true landmark positions (world mm)
    inside: np.ndarray  # [264] bool: landmark inside the field of view


def _cpu_s() -> float:
    """CPU seconds of this process, every thread (torch's and ITK's) counted."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def template() -> Scan:
    from nilearn import datasets

    from anatomap.data.demo.template import landmark_set

    img = datasets.load_mni152_template(resolution=1)
    _, xyz = landmark_set("power")
    t1 = np.clip(np.asarray(img.get_fdata(), np.float32), 0, None)
    return Scan(t1, np.asarray(img.affine, np.float64), xyz, np.ones(len(xyz), bool))


def target(t: Scan, index: int, partial: bool) -> Scan:
    """The template under subject ``index``'s random affine + B-spline warp, on a 1 mm grid."""
    from scipy import ndimage as ndi

    from anatomap import geometry
    from anatomap.data.demo.template import foreground_points
    from anatomap.data.demo.transforms import draw_subject
    from anatomap.data.phantoms import oriented_affine

    tf = draw_subject(SEED, index, spacing=1.0, landmarks="power").transform
    content = tf.to_subject(foreground_points("power"))
    aff = oriented_affine("RAS", (1.0, 1.0, 1.0), (content.min(0) + content.max(0)) / 2, SHAPE)
    world = geometry.world_grid(aff, SHAPE) + tf.displacement_on_grid(aff, SHAPE)
    ijk = geometry.world_to_voxel(t.affine, geometry.apply_affine(tf.affine, world))
    del world
    image = ndi.map_coordinates(t.image, ijk.reshape(-1, 3).T, order=1, cval=0.0)
    image = image.reshape(SHAPE).astype(np.float32)
    if partial:
        start = SHAPE[2] - round(KEEP * SHAPE[2])
        image = np.ascontiguousarray(image[:, :, start:])
        aff = geometry.crop_affine(aff, [0, 0, start])
    truth = tf.to_subject(t.truth_mm)
    inside = geometry.inside(geometry.world_to_voxel(aff, truth), image.shape)
    return Scan(image, aff, truth, inside)


# -- matchers ---------------------------------------------------------------------------------


class Model:
    """Embed (the checkpoint's preprocessing + sliding window) + match_points."""

    def __init__(self, model, t: Scan, window: int) -> None:
        from anatomap.infer.match import match_points

        self.model, self.window = model, window
        self.name = f"embed + match, window {window}"
        self.spacing = self.model.meta.get("data", {}).get("spacing")
        t0 = time.perf_counter()
        self.template = self.embed(t)
        self.template_s = time.perf_counter() - t0
        match_points(self.template, t.truth_mm[:5], self.embed(t))  # first-call costs

    def embed(self, scan: Scan):
        from anatomap.data.volume import Volume
        from anatomap.infer.embed import embed_array, preprocess_for

        pre = preprocess_for(self.model, Volume(scan.image, scan.affine, modality="t1"))
        self.grid = pre.shape
        return embed_array(
            self.model, pre.array[None], pre.affine, window=self.window, device="cpu"
        )

    def run(self, t: Scan, scan: Scan) -> tuple[np.ndarray, dict[str, float]]:
        from anatomap.infer.match import match_points

        t0, c0 = time.perf_counter(), _cpu_s()
        emb = self.embed(scan)
        t1 = time.perf_counter()
        res = match_points(self.template, t.truth_mm, emb)
        t2, c2 = time.perf_counter(), _cpu_s()
        self.last = emb
        times = {"embed_s": t1 - t0, "match_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0}
        return res.points_mm, times


class Registration:
    """A SimpleITK registration of the template (fixed) to the target (moving)."""

    def __init__(self, name: str, threads: int, t: Scan) -> None:
        from anatomap.eval import registration as reg
        from anatomap.io.writers import array_affine_to_sitk

        kind = {
            "affine": reg.AffineRegistration,
            "rigid+affine": reg.RigidAffineRegistration,
            "affine+bspline": reg.BSplineRegistration,
        }[name]
        self.name, self.reg = name, kind(threads=threads)
        self.fixed = array_affine_to_sitk(t.image, t.affine)

    def run(self, t: Scan, scan: Scan) -> tuple[np.ndarray, dict[str, float]]:
        from anatomap.eval.registration import transform_points_ras
        from anatomap.io.writers import array_affine_to_sitk

        t0, c0 = time.perf_counter(), _cpu_s()
        moving = array_affine_to_sitk(scan.image, scan.affine)
        pts = transform_points_ras(self.reg.register(self.fixed, moving), t.truth_mm)
        return pts, {"total_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0}


# -- points against time and memory -----------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    """One number of points: fresh and warm seconds, peak memory (a JSON line)."""
    from anatomap.infer.embed import DenseEmbedding
    from anatomap.infer.match import match_points

    torch.set_num_threads(args.threads)
    template = DenseEmbedding.load(args.emb[0])
    target = DenseEmbedding.load(args.emb[1])
    pts = np.load(args.emb[2])[: args.n]
    match_points(template, pts[:2], template)  # imports and first-call costs
    template._match_target = None  # type: ignore[attr-defined]
    base = hwm_mb(reset=True)
    t0, c0 = time.perf_counter(), _cpu_s()
    match_points(template, pts, target)
    fresh, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = hwm_mb()
    warm = math.nan  # a second call only where it costs little
    if fresh < 10:
        t0 = time.perf_counter()
        match_points(template, pts, target)
        warm = time.perf_counter() - t0
    info = {"fresh": fresh, "cpu": cpu, "warm": warm}
    print(json.dumps({**info, "peak_mb": peak, "base_mb": base}))


def curves(model: Model, t: Scan, sizes: list[int], threads: int) -> list[list[str]]:
    from anatomap import geometry

    rng = np.random.default_rng(0)
    brain = np.argwhere(t.image > 0.2 * t.image.max()).astype(np.float64)

    ijk = brain[rng.integers(len(brain), size=max(sizes))] + rng.uniform(-0.5, 0.5, (max(sizes), 3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / "template.emb.safetensors", Path(tmp) / "target.emb.safetensors"]
        model.template.save(files[0])
        model.last.save(files[1])
        np.save(Path(tmp) / "points.npy", geometry.voxel_to_world(t.affine, ijk))
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--threads", str(threads)]
            cmd += ["--emb", *map(str, files), str(Path(tmp) / "points.npy")]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise RuntimeError(f"{n} points: {out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>7} points: {r}", file=sys.stderr, flush=True)
            rows.append(
                [
                    f"{n:,}",
                    f"{r['fresh']:.3f}",
                    f"{r['cpu']:.3f}",
                    "-" if math.isnan(r["warm"]) else f"{r['warm']:.3f}",
                    f"{1000 * min(r['fresh'], r['warm']) / n:.2f}",
                    f"{r['peak_mb']:.0f} (+{r['peak_mb'] - r['base_mb']:.0f})",
                ]
            )
    return rows


# -- the run ----------------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _tables(
    res: dict[str, dict[str, list[dict]]], models: list[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Per field of view and matcher: mean seconds, errors, ratios; then issue 18's targets
    for every model row (ratios: to the first model row, the default window)."""
    rows, checks = [], []
    for cond, by in res.items():
        mean = {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for m, rs in by.items()}
        for m, v in mean.items():
            errs = np.concatenate([r["errors"] for r in by[m]])
            rows.append(
                [
                    cond,
                    m,
                    f"{v['total_s']:.2f}",
                    f"{v['cpu_s']:.2f}",
                    f"{v['embed_s']:.2f}" if "embed_s" in v else "-",
                    f"{v['match_s']:.3f}" if "match_s" in v else "-",
                    f"{np.median(errs):.2f}",
                    f"{np.mean(errs):.2f}",
                    f"{v['total_s'] / mean[models[0]]['total_s']:.1f}x",
                    f"{v['cpu_s'] / mean[models[0]]['cpu_s']:.1f}x",
                ]
            )
        for model in models:
            m_s, t_s = mean[model]["match_s"], mean[model]["total_s"]
            checks += [
                [
                    cond,
                    model,
                    "match < 0.5 s per target, once embedded",
                    f"{m_s:.3f} s",
                    _met(m_s < 0.5),
                ],
                [cond, model, "embed + match < 1.5 s per target", f"{t_s:.2f} s", _met(t_s < 1.5)],
            ]
            for rival, factor in (("rigid+affine", 4.0), ("affine+bspline", 50.0)):
                if rival in mean:
                    ratio = mean[rival]["total_s"] / t_s
                    what = f">= {factor:.0f}x faster than {rival}"
                    checks.append([cond, model, what, f"{ratio:.1f}x", _met(ratio >= factor)])
    return rows, checks


def _errors(scan: Scan, pts: np.ndarray) -> np.ndarray:
    return np.linalg.norm(pts - scan.truth_mm, axis=1)[scan.inside]


def _setup(args: argparse.Namespace) -> str:
    load, threads = os.getloadavg()[0], args.threads
    return (
        f"{threads} threads for torch and SimpleITK, OMP_NUM_THREADS "
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {load:.2f} at the start"
    )


def run_targets(args: argparse.Namespace, t: Scan, models: list[Model]) -> list[str]:
    """Every matcher on the same targets: the per-target table and issue 18's targets."""
    t0, setup = time.perf_counter(), _setup(args)
    matchers = [*models, *(Registration(n, args.threads, t) for n in args.registrations)]
    res: dict[str, dict[str, list[dict]]] = {}
    for cond, partial in (("full", False), (f"partial ({KEEP:.0%} S-I)", True)):
        res[cond] = {m.name: [] for m in matchers}
        for i in range(1 if args.quick else args.targets):
            scan = target(t, i, partial)
            for m in matchers:
                pts, times = m.run(t, scan)
                res[cond][m.name].append({**times, "errors": _errors(scan, pts)})
                print(f"{cond} {i} {m.name}: {times}", file=sys.stderr, flush=True)
            if not partial and i == 0:
                full_grid = models[0].grid
    rows, checks = _tables(res, [m.name for m in models])
    minutes = (time.perf_counter() - t0) / 60
    headers = ["field of view", "matcher", "s per target", "CPU s", "embed s", "match s"]
    headers += ["median error mm", "MRE mm", f"time / {models[0].name}", "CPU / same"]
    return [
        "### Embed + match against registration (issue 18)",
        "",
        f"Template: the 1 mm MNI152 2009 T1 ({'x'.join(map(str, t.image.shape))}) with the "
        f"264 Power landmarks; targets: the T1 under a random affine + B-spline warp on a "
        f"{'x'.join(map(str, SHAPE))} grid at 1 mm, {1 if args.quick else args.targets} per "
        f"field of view (partial: the top {KEEP:.0%} along S-I). Model `{args.model}`, trained "
        f"at {models[0].spacing} mm: embed resamples each 1 mm scan to that "
        f"({'x'.join(map(str, full_grid))} voxels for the full field of view) and embeds it on "
        "the CPU (float16 maps; window 64, the default, with overlap 0.25: 8 windows here; "
        "window 112: one pass); all 264 points matched per target; registration on the 1 mm "
        f"images. CPU s: the process's CPU time, every thread. {setup}, "
        f"{os.getloadavg()[0]:.2f} at the end ({minutes:.1f} min). Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(headers, rows, "ll" + "r" * (len(headers) - 2)),
        "",
        "Issue 18's targets:",
        "",
        *table(["field of view", "model row", "target", "measured", "met"], checks, "lllrl"),
    ]


def run_points(args: argparse.Namespace, t: Scan, model: Model) -> list[str]:
    """``match_points`` on the first full-FOV target: points against time and memory."""
    setup = _setup(args)
    model.run(t, target(t, 0, False))
    rows = curves(model, t, args.points, args.threads)
    return [
        "### `match_points`: points against time and peak memory (issue 18)",
        "",
        f"Model `{args.model}` (window {model.window}); template: the 1 mm MNI152 T1 embedded at "
        f"{model.spacing} mm; target: the first full-field-of-view target of the table above; "
        "points: random positions in the template's brain. Each count in its own process: "
        "fresh = the first call on the target (its state built), warm = a second call (when "
        "the first took under 10 s); peak = the process's high-water mark above what it held "
        f"with both embeddings loaded. {setup}, {os.getloadavg()[0]:.2f} at the end. "
        f"Machine: {machine()}.",
        f"Command: `{command()}`",
        "",
        *table(
            ["points", "fresh s", "fresh CPU s", "warm s", "ms per point", "peak MB (+match)"],
            rows,
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="brain-mri", help="checkpoint, run or shipped name")
    ap.add_argument("--part", choices=("all", "targets", "points"), default="all")
    ap.add_argument("--targets", type=int, default=3, help="targets per field of view")
    ap.add_argument("--quick", action="store_true", help="one target per field of view")
    ap.add_argument(
        "--windows", type=int, nargs="+", default=[64, 112], help="embed windows (a row each)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads")
    ap.add_argument("--points", type=int, nargs="+", default=[10, 100, 1000, 10_000, 100_000])
    ap.add_argument(
        "--registrations", nargs="*", default=list(REGISTRATIONS), choices=REGISTRATIONS
    )
    ap.add_argument("--write", action="store_true", help="write the blocks to docs/benchmarks.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--emb", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from anatomap.infer.embed import DenseModel

    torch.set_num_threads(args.threads)
    t = template()
    dense = DenseModel.from_checkpoint(args.model)
    models = [Model(dense, t, w) for w in args.windows]
    if args.part in ("all", "targets"):
        publish("embed_match", run_targets(args, t, models), args.write)
    if args.part in ("all", "points"):
        publish("embed_match_points", run_points(args, t, models[0]), args.write)


if __name__ == "__main__":
    main()
