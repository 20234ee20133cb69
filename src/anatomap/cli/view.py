"""``anatomap view``: the interactive match viewer (one self-contained HTML page), and the
page writer of ``anatomap match --view``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anatomap.cli.options import (
    add_embedding_options,
    add_point_options,
    add_quiet,
    check_device,
    embedding_options,
)
from anatomap.cli.report import OK


def write_match_view(
    out: str | Path,
    template: str | Path,
    targets: Sequence[str | Path],
    template_emb: Any,
    target_embs: Sequence[Any],
    found: Any,
    *,
    calibration: dict[str, Any] | None = None,
    components: int = 32,
) -> Path:
    """The viewer page of matches already made (``anatomap match --view FILE.html``):
    ``found`` is what ``anatomap.match`` returned (``Matches``, or its rows), made from the
    embeddings ``template_emb`` / ``target_embs`` of the files ``template`` / ``targets``
    (nothing is embedded again); ``calibration``: the model's (``meta["calibration"]``), so
    that clicks in the page report P(within 5 mm) too."""
    from anatomap.infer.view import ViewScan, view_matches

    return view_matches(
        out,
        ViewScan.from_path(template, template_emb),
        [ViewScan.from_path(t, e) for t, e in zip(targets, target_embs, strict=True)],
        found,
        calibration=calibration,
        components=(components, components),
    )


def cmd_view(args: argparse.Namespace) -> int:
    from anatomap.infer.embed import DenseModel
    from anatomap.infer.view import build_view

    check_device(args.device)
    out = build_view(
        DenseModel.from_checkpoint(args.checkpoint),
        args.template,
        list(args.targets),
        args.points,
        args.out,
        voxel=args.voxel,
        coords=args.coords,
        low_score=args.low_score,
        embedding=embedding_options(args),
        components=(args.components, args.components),
    )
    size = out.stat().st_size / 1e6
    print(f"{out}: {len(args.targets)} target(s), {size:.1f} MB; open it in a web browser")
    return OK


def _add_view(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap view``."""
    p = sub.add_parser(
        "view",
        help="interactive match viewer: one HTML page, template and target side by side, "
        "click the template to match",
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        help="dense checkpoint: run folder, checkpoint folder, meta.json or shipped name",
    )
    p.add_argument("targets", type=Path, nargs="+", help="scans or saved .emb.safetensors")
    p.add_argument("--out", type=Path, default=Path("view.html"), help="the page (.html)")
    p.add_argument(
        "--components",
        type=int,
        default=32,
        metavar="K",
        help="principal components of the embeddings the page keeps for click-to-match "
        "(more: a bigger page, closer to the full-precision matches)",
    )
    add_point_options(p)
    add_embedding_options(p)
    add_quiet(p)
    p.set_defaults(func=cmd_view)
