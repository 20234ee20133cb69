"""Channel stacking vs per-modality stems with mean fusion, under missing modalities.

Trains the same small_cnn with the ``topo`` objective (modality dropout included) twice from
the same seed, once per ``modality_fusion`` option, then runs the missing-modality
robustness readout of ``anatomap.eval.robustness`` (position metrics on held-out crops with
every modality and with each one dropped). Prints a table and writes JSON.

    python benchmarks/modality_fusion.py CACHE --heldout-file SUBJECTS.csv --steps 100

CACHE: a multi-modal cache, e.g. the one of
``anatomap demo --out demo_mm --modalities T1w,T2w,FLAIR --config topo``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from anatomap.data.cache import Cache
from anatomap.data.sampler import LocatedViewDataset
from anatomap.eval.position import embed, position_readout, sample_crops
from anatomap.eval.robustness import condition_name, drop_channel
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config


def heldout(path: Path | None, cache: Cache, n: int) -> list[str]:
    if path is None:
        return cache.subjects[-n:]
    import csv

    with open(path, newline="") as fh:
        return [r["subject"] for r in csv.DictReader(fh) if r["split"] == "heldout"]


def train(
    fusion: str, cache: Cache, train_subjects: list[str], steps: int, batch: int, seed: int
) -> tuple[torch.nn.Module, torch.nn.Module, float, int]:
    torch.manual_seed(seed)
    opts = {"modality_fusion": fusion, **({"stem_channels": 16} if fusion == "mean" else {})}
    enc = build_encoder(EncoderSpec("small_cnn", 3, len(cache.modalities), 64, opts))
    obj = get_objective("topo")(objective_config({"name": "topo", "inter_start_step": 0}), enc)
    ds = LocatedViewDataset(cache, train_subjects, obj.view_spec(), steps * batch, seed=seed)
    params = list(enc.parameters()) + list(obj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    for step in range(steps):
        b = torch.utils.data.default_collate([ds[step * batch + i] for i in range(batch)])
        loss = obj(enc, b)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        obj.on_after_step(enc, step, steps)
    per_step = (time.perf_counter() - t0) / steps
    return enc.eval(), obj.eval(), per_step, sum(p.numel() for p in enc.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--heldout-file", type=Path)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--crops", type=int, default=32, help="crops per held-out subject")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("modality_fusion.json"))
    args = ap.parse_args()

    cache = Cache(args.cache)
    test = heldout(args.heldout_file, cache, 4)
    train_subjects = [s for s in cache.subjects if s not in set(test)]
    crops = sample_crops(cache, test, (32, 32, 32), args.crops, args.seed)
    conditions = [(None, None), *enumerate(cache.modalities)]
    results: dict = {}
    for fusion in ("stack", "mean"):
        enc, obj, per_step, n_params = train(
            fusion, cache, train_subjects, args.steps, args.batch, args.seed
        )
        res = {"s_per_step": per_step, "encoder_parameters": n_params, "conditions": {}}
        for c, m in conditions:
            e = embed(lambda x, enc=enc, obj=obj: obj.embed(enc, x), drop_channel(crops.images, c))
            r = position_readout(e, crops.centres, crops.groups, args.seed)
            res["conditions"][condition_name(m)] = r.metrics()
        results[fusion] = res
    print(f"{args.steps} steps x {args.batch} volumes, {len(test)} held-out subjects")
    print(f"{'fusion':<7} {'condition':<16} {'Spearman':>8} {'R^2':>6} {'err mm':>7} {'drop':>6}")
    for fusion, res in results.items():
        base = res["conditions"]["all modalities"]["mean_error_mm"]
        for cond, met in res["conditions"].items():
            print(
                f"{fusion:<7} {cond:<16} {met['spearman']:>8.3f} {met['r2']:>6.3f} "
                f"{met['mean_error_mm']:>7.2f} {met['mean_error_mm'] - base:>+6.2f}"
            )
        drops = [
            met["mean_error_mm"] - base
            for cond, met in res["conditions"].items()
            if cond != "all modalities"
        ]
        res["mean_error_drop_mm"] = float(np.mean(drops))
        print(
            f"{fusion:<7} mean drop {res['mean_error_drop_mm']:+.2f} mm, "
            f"{res['encoder_parameters']} parameters, {res['s_per_step']:.2f} s/step"
        )
    args.out.write_text(
        json.dumps(
            {"args": vars(args) | {"cache": str(args.cache)}, **results}, indent=1, default=str
        )
    )


if __name__ == "__main__":
    main()
