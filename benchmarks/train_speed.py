"""Training speed per method, before and after issue 18, measured side by side (CPU).

For each packaged method config (``--methods``), on a demo cache: training steps per second
(forward, backward, gradient clipping, AdamW, ``on_after_step``) fed (a) by the training
loader and (b) by the same number of batches drawn beforehand and held in memory; rounds
alternate (a) and (b), the best round of each counts; loader overhead = 1 - rate(a) / rate(b).
Two settings per method, each in its own process:

- **before**: the code as it was: SAM's loss as a Python loop over volumes x directions
  (``LegacySAM`` below, kept for this comparison), ``data.num_workers: 2`` (the old packaged
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
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import Trainee, command, demo_cache, machine, met, peak_rss_mb, publish, table

from anatomap import geometry
from anatomap.config import config_path, load_config
from anatomap.data.cache import Cache
from anatomap.objectives.base import batch_generator, flatten_views
from anatomap.objectives.sam import SAM, info_nce, mine_hard_negatives, outside_radius
from anatomap.train.module import PretrainModule, ViewDataModule


class LegacySAM(SAM):
    """SAM's loss before issue 18: one loop over volumes x directions, every term per pair
    (the same code as ``tests/test_train_speed.py``'s reference)."""

    def forward(self, encoder, batch):  # type: ignore[no-untyped-def]
        images = batch["image"]
        b = images.shape[0]
        coarse, fine = self.dense(encoder, flatten_views(images))
        coarse = coarse.view(b, 2, *coarse.shape[1:]).float()
        fine = fine.view(b, 2, *fine.shape[1:]).float()
        affines = batch["affine"].to(torch.float64)
        c_aff = geometry.feature_affine(affines, self.strides[0])
        f_aff = geometry.feature_affine(affines, self.strides[1])
        gen = batch_generator(batch)
        fine_losses, coarse_losses = [], []
        for i in range(b):
            for a, o in ((0, 1), (1, 0)):
                fl = self._legacy_fine(
                    fine[i, a], fine[i, o], coarse[i, a], coarse[i, o],
                    f_aff[i, a], f_aff[i, o], c_aff[i, a], c_aff[i, o], gen,
                )  # fmt: skip
                if fl is not None:
                    fine_losses.append(fl)
                others = [coarse[j, v] for j in range(b) if j != i for v in (0, 1)]
                cl = self._legacy_coarse(
                    coarse[i, a], coarse[i, o], c_aff[i, a], c_aff[i, o], others, gen
                )
                if cl is not None:
                    coarse_losses.append(cl)
        zero = images.sum() * 0.0
        fine_l = torch.stack(fine_losses).mean() if fine_losses else zero
        coarse_l = torch.stack(coarse_losses).mean() if coarse_losses else zero
        return {"loss": fine_l + coarse_l, "fine": fine_l.detach(), "coarse": coarse_l.detach()}

    @staticmethod
    def _legacy_anchors(map_a, map_o, aff_a, aff_o, count, gen):  # type: ignore[no-untyped-def]
        world_a = geometry.world_grid(aff_a, tuple(map_a.shape[1:])).reshape(-1, 3)
        in_o = geometry.world_to_voxel(aff_o, world_a)
        overlap = geometry.inside(in_o, tuple(map_o.shape[1:])).nonzero().flatten()
        if len(overlap) < 1:
            return None
        pick = overlap[torch.randperm(len(overlap), generator=gen)[:count]]
        anchors = F.normalize(map_a.flatten(1).T[pick], dim=-1)
        return pick, world_a[pick], anchors, geometry.sample_map(map_o, in_o[pick])

    def _legacy_fine(  # type: ignore[no-untyped-def]
        self, fa, fo, ca, co, faff_a, faff_o, caff_a, caff_o, gen
    ):
        c = self.config
        found = self._legacy_anchors(fa, fo, faff_a, faff_o, c.fine_anchors, gen)
        if found is None:
            return None
        _, anchor_w, anchors, positives = found
        cand_w = geometry.world_grid(faff_o, tuple(fo.shape[1:])).reshape(-1, 3)
        sub = torch.randperm(len(cand_w), generator=gen)[: c.fine_candidates]
        cand, cand_w = fo.flatten(1).T[sub], cand_w[sub]
        valid = outside_radius(anchor_w, cand_w, c.fine_ignore_mm)
        with torch.no_grad():
            anchor_c = geometry.sample_map(ca, geometry.world_to_voxel(caff_a, anchor_w))
            cand_c = geometry.sample_map(co, geometry.world_to_voxel(caff_o, cand_w))
            sim = anchors @ cand.T + anchor_c @ cand_c.T
            idx, ok = mine_hard_negatives(sim, valid, c.hard_pool, c.hard_keep, gen)
        return info_nce(anchors, positives, cand[idx], c.temperature, ok)

    def _legacy_coarse(self, ca, co, caff_a, caff_o, others, gen):  # type: ignore[no-untyped-def]
        c = self.config
        found = self._legacy_anchors(ca, co, caff_a, caff_o, c.coarse_anchors, gen)
        if found is None:
            return None
        pick, anchor_w, anchors, positives = found
        cand = co.flatten(1).T
        cand_w = geometry.world_grid(caff_o, tuple(co.shape[1:])).reshape(-1, 3)
        valid = outside_radius(anchor_w, cand_w, c.coarse_ignore_mm)
        if others and c.coarse_global_negatives > 0:
            pool = torch.cat([o.flatten(1).T for o in others])
            take = torch.randperm(len(pool), generator=gen)[: c.coarse_global_negatives]
            cand = torch.cat([cand, pool[take]])
            valid = torch.cat([valid, valid.new_ones(len(pick), len(take))], dim=1)
        if not valid.any():
            return None
        return info_nce(anchors, positives, cand, c.temperature, valid)


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
        module.objective.__class__ = LegacySAM  # same parameters, the old forward
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
