"""``anatomap embed``, ``match`` and ``export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_embed(args: argparse.Namespace) -> int:
    from anatomap.api import embed
    from anatomap.infer.embed import embedding_names

    embed(args.checkpoint, args.volumes, args.out, window=args.window, overlap=args.overlap)
    for v, name in zip(args.volumes, embedding_names(args.volumes), strict=True):
        print(f"{v} -> {args.out / name}")
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    from anatomap.api import match

    rows = match(
        args.checkpoint,
        args.template,
        args.points,
        args.targets,
        voxel=args.voxel,
        low_score=args.low_score,
        out=args.out,
        coords=args.coords,
        window=args.window,
    )
    low = [r for r in rows if r["low_confidence"]]
    if str(args.out).lower().endswith(".mrk.json"):
        print(f"{len(rows)} matches written to {args.out} (3D Slicer markups, LPS)")
    else:
        print(f"{len(rows)} matches written to {args.out} (and {args.out}.json)")
    for r in low:
        why = (
            f"P(within 5 mm) {r['p_within_5mm']:.2f} < 0.5"
            if "p_within_5mm" in r
            else f"score {r['score']:.2f} < {args.low_score}"
        )
        print(
            f"low confidence: {r['name']} in {r['target']} ({why}): the target may not "
            "contain this anatomy",
            file=sys.stderr,
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from anatomap.infer.export import export_checkpoint

    res = export_checkpoint(
        args.checkpoint, args.to, args.out, out_channels=args.out_channels, size=args.size
    )
    print(f"{res.target}: {res.matched} encoder tensors -> {res.path} (settings: {res.sidecar})")
    for key, why in res.not_exported.items():
        print(f"not exported: {key}: {why}")
    return 0


def _add_embed(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap embed``."""
    p = sub.add_parser(
        "embed", help="dense embeddings of whole scans (dense checkpoints, e.g. sam)"
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("volumes", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="folder for <name>.emb.safetensors")
    p.add_argument("--window", type=int, default=64, help="sliding-window edge (voxels)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.set_defaults(func=cmd_embed)


def _add_match(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap match``."""
    p = sub.add_parser("match", help="find template points in target scans")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("targets", type=Path, nargs="+", help="scans or saved .emb.safetensors")
    p.add_argument("--template", type=Path, required=True, help="scan or saved embedding")
    p.add_argument(
        "--points",
        type=Path,
        required=True,
        help="CSV (name,x,y,z or i,j,k) or 3D Slicer markups (.mrk.json, .fcsv)",
    )
    p.add_argument("--voxel", action="store_true", help="points are template voxel indices")
    p.add_argument(
        "--coords",
        type=str.upper,
        choices=("RAS", "LPS"),
        default="RAS",
        help="world frame of a points CSV's x,y,z (default: RAS; Slicer files state their own)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("matches.csv"),
        help="CSV (plus OUT.json) of the matches with target voxel indices i,j,k; a name "
        "ending in .mrk.json writes 3D Slicer markups instead (default: matches.csv)",
    )
    p.add_argument(
        "--low-score",
        type=float,
        default=0.5,
        help="flag matches scoring below this (calibrated models flag P(within 5 mm) < 0.5)",
    )
    p.add_argument("--window", type=int, default=64)
    p.set_defaults(func=cmd_match)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap export``."""
    p = sub.add_parser(
        "export", help="a checkpoint's encoder as a MONAI UNet/SwinUNETR or TorchScript file"
    )
    p.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    p.add_argument("--to", required=True, choices=("monai-unet", "swinunetr", "torchscript"))
    p.add_argument("--out", type=Path, required=True, help="FILE (.safetensors or .pt)")
    p.add_argument(
        "--out-channels",
        type=int,
        help="network output channels (monai-unet: a multiple of num_groups, default "
        "num_groups; swinunetr: default 2)",
    )
    p.add_argument("--size", type=int, help="torchscript: edge of the tracing input (voxels)")
    p.set_defaults(func=cmd_export)
