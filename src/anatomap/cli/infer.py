"""``anatomap embed``, ``match`` and ``export``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anatomap.cli.options import (
    add_embedding_options,
    add_point_options,
    add_quiet,
    check_device,
    embedding_options,
)
from anatomap.cli.report import OK
from anatomap.errors import AnatomapError


def cmd_embed(args: argparse.Namespace) -> int:
    from anatomap.api import embed
    from anatomap.infer.embed import embedding_names

    check_device(args.device)
    embed(args.checkpoint, list(args.volumes), args.out, **embedding_options(args))
    for v, name in zip(args.volumes, embedding_names(args.volumes), strict=True):
        print(f"{v} -> {args.out / name}")
    return OK


def _warn_low(rows: list[dict], low_score: float) -> None:
    """One stderr line per low-confidence match (a warning: the exit code stays 0)."""
    for r in rows:
        if not r["low_confidence"]:
            continue
        if r.get("consistent") is False:
            why = "off the robust affine of the other matches by more than 10 mm"
        elif "p_within_5mm" in r:
            why = f"P(within 5 mm) {r['p_within_5mm']:.2f} < 0.5"
        else:
            why = f"score {r['score']:.2f} < {low_score}"
        print(
            f"low confidence: {r['name']} in {r['target']} ({why}): the target may not "
            "contain this anatomy",
            file=sys.stderr,
        )


def cmd_match(args: argparse.Namespace) -> int:
    from anatomap.api import match
    from anatomap.cli.view import write_match_view
    from anatomap.infer.embed import DenseModel
    from anatomap.infer.spheres import check_spheres

    check_device(args.device)
    if args.spheres is not None:  # before any work: a bad name or radius is one line
        check_spheres(args.spheres, args.sphere_radius)
    if args.view is not None and not str(args.view).lower().endswith((".html", ".htm")):
        raise AnatomapError(f"{args.view}: --view writes an HTML page: name it *.html")
    model = DenseModel.from_checkpoint(args.checkpoint)
    result = match(
        model,
        args.template,
        args.points,
        list(args.targets),
        voxel=args.voxel,
        coords=args.coords,
        low_score=args.low_score,
        keep_embeddings=args.view is not None,
        **embedding_options(args),
    )
    result.save(args.out)
    rows = result.rows()
    if str(args.out).lower().endswith(".mrk.json"):
        print(f"{len(rows)} matches written to {args.out} (3D Slicer markups, LPS)")
    else:
        print(f"{len(rows)} matches written to {args.out} (and {args.out}.json)")
    if args.spheres is not None:
        for path in result.to_spheres(args.spheres, args.sphere_radius):
            print(f"spheres: {path} (label k = the k-th point, radius {args.sphere_radius} mm)")
    if args.view is not None and result.embeddings is not None:
        t_emb, embs = result.embeddings
        page = write_match_view(
            args.view,
            args.template,
            args.targets,
            t_emb,
            embs,
            result,
            calibration=model.meta.get("calibration"),
        )
        print(f"viewer: {page} (open it in a browser; docs/viewer.md)")
    _warn_low(rows, args.low_score)
    return OK


def cmd_export(args: argparse.Namespace) -> int:
    from anatomap.infer.export import UNET_OPTIONS, export_checkpoint

    unet = {k: getattr(args, k) for k in UNET_OPTIONS if getattr(args, k) is not None}
    res = export_checkpoint(
        args.checkpoint,
        args.to,
        args.out,
        out_channels=args.out_channels,
        size=args.size,
        strict=args.strict,
        **unet,
    )
    if res.report is None:
        print(
            f"{res.target}: {res.matched} encoder tensors -> {res.path} (settings: {res.sidecar})"
        )
        return OK
    print(f"{res.target}: {res.path} (settings and every tensor's fate: {res.sidecar})")
    for line in res.report.summary_lines():
        print(line)
    return OK


def _int_list(text: str) -> list[int]:
    """``16,32,64`` -> ``[16, 32, 64]``."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected integers, e.g. 16,32,64") from None


_CHECKPOINT_HELP = "dense checkpoint: run folder, checkpoint folder, meta.json or shipped name"


def _add_embed(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap embed``."""
    p = sub.add_parser(
        "embed", help="dense embeddings of whole scans (dense checkpoints, e.g. sam)"
    )
    p.add_argument("checkpoint", type=Path, help=_CHECKPOINT_HELP)
    p.add_argument("volumes", type=Path, nargs="+", help="scans (files or DICOM folders)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for <name>.emb.safetensors (created)",
    )
    add_embedding_options(p)
    add_quiet(p)
    p.set_defaults(func=cmd_embed)


def _add_match(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap match``."""
    p = sub.add_parser("match", help="find template points in target scans")
    p.add_argument("checkpoint", type=Path, help=_CHECKPOINT_HELP)
    p.add_argument("targets", type=Path, nargs="+", help="scans or saved .emb.safetensors")
    add_point_options(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("matches.csv"),
        metavar="FILE",
        help="CSV (plus FILE.json) of the matches with target voxel indices i,j,k; a name "
        "ending in .mrk.json writes 3D Slicer markups instead",
    )
    p.add_argument(
        "--spheres",
        type=Path,
        metavar="FILE",
        help="also a label image of spheres at the matches, on the target's grid (.nii.gz, "
        ".nii, .nrrd, .mha; label k = the k-th point); with several targets one file each, "
        "named FILE + _<target name>",
    )
    p.add_argument(
        "--sphere-radius", type=float, default=2.0, metavar="MM", help="sphere radius in mm"
    )
    add_embedding_options(p)
    add_quiet(p)
    p.add_argument(
        "--view",
        type=Path,
        metavar="FILE",
        help="also a self-contained HTML viewer of template, targets and matches (NiiVue; "
        "click a template point to see its similarity map: docs/viewer.md)",
    )
    p.set_defaults(func=cmd_match)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap export``."""
    p = sub.add_parser(
        "export", help="a checkpoint's encoder as a MONAI UNet/SwinUNETR or TorchScript file"
    )
    p.add_argument(
        "checkpoint", type=Path, help="run folder, checkpoint folder or shipped model name"
    )
    p.add_argument(
        "--to",
        required=True,
        choices=("monai-unet", "swinunetr", "torchscript"),
        help="what to write the encoder as",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="file (.safetensors or .pt)"
    )
    p.add_argument(
        "--out-channels",
        type=int,
        metavar="N",
        help="network output channels (monai-unet: default the group count with group norm, "
        "of which it must be a multiple, else 2; swinunetr: default 2)",
    )
    u = p.add_argument_group(
        "monai-unet: the UNet to build (default: the one that fits the encoder exactly)"
    )
    u.add_argument(
        "--norm",
        metavar="NORM",
        help="group (the encoder's group count), group:G, instance, instance:affine or batch "
        "(default: the encoder's GroupNorm)",
    )
    u.add_argument(
        "--channels",
        type=_int_list,
        metavar="C,C,...",
        help="every layer's channels, the bottom layer last, e.g. 16,32,64,128,256 (default: "
        "the encoder's stages and twice the deepest)",
    )
    u.add_argument(
        "--strides",
        type=_int_list,
        metavar="S,S,...",
        help="one stride per down layer (default: all 2)",
    )
    u.add_argument("--num-res-units", type=int, metavar="N", help="subunits per layer (default: 2)")
    u.add_argument("--act", metavar="NAME", help="MONAI activation name (default: prelu)")
    u.add_argument("--dropout", type=float, metavar="P", help="dropout (default: 0)")
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail unless every encoder tensor (but the pooled projection) is transferred",
    )
    p.add_argument("--size", type=int, help="torchscript: edge of the tracing input (voxels)")
    add_quiet(p, "accepted for uniformity (export prints no progress)")
    p.set_defaults(func=cmd_export)
