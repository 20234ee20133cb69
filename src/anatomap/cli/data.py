"""``anatomap data index`` and ``anatomap data cache``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anatomap.errors import AnatomapError


def cmd_index(args: argparse.Namespace) -> int:
    from anatomap.data.manifest import index_directory, write_manifest

    if args.dir is None and args.table is None:
        raise AnatomapError("data index needs a folder to scan or --table CSV")
    root = args.dir if args.dir is not None else args.table.parent
    result = index_directory(
        root,
        table=args.table,
        expect_ndim=args.ndim,
        progress=not args.quiet,
        resample=args.resample,
        reference=args.reference,
    )
    write_manifest(result, args.out)
    for s in result.subjects:
        for what, why in s.resampled.items():
            print(f"resampled onto {s.reference}: {s.subject} {what}: {why}", file=sys.stderr)
    for p in result.problems:
        print(f"rejected: {p.path}: {p.reason}", file=sys.stderr)
    print(
        f"indexed {len(result.subjects)} subjects into {args.out}; "
        f"{len(result.problems)} file(s) rejected"
    )
    return 1 if result.problems else 0


def cmd_cache(args: argparse.Namespace) -> int:
    from anatomap.data.cache import build_cache

    res = build_cache(
        args.manifest,
        args.out,
        preset=args.preset,
        spacing=args.spacing,
        dtype=args.dtype,
        progress=not args.quiet,
        modalities=args.modalities.split(",") if args.modalities else None,
    )
    for p in res.problems:
        print(f"rejected: subject {p['subject']}: {p['reason']}", file=sys.stderr)
    print(
        f"cache {args.out}: {len(res.cache)} subjects ({res.built} built, {res.reused} reused), "
        f"{len(res.problems)} rejected"
    )
    return 1 if res.problems else 0


def _add_data(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap data index`` and ``anatomap data cache``."""
    data = sub.add_parser("data", help="index and cache scans")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("index", help="find and validate scans; write a JSONL manifest")
    p.add_argument("dir", type=Path, nargs="?", help="folder to scan (not needed with --table)")
    p.add_argument("--out", type=Path, required=True, help="manifest.jsonl to write")
    p.add_argument("--table", type=Path, help="CSV subject,modality,path[,kind] instead of names")
    p.add_argument("--ndim", type=int, default=3, choices=(2, 3), help="expected dimensionality")
    p.add_argument(
        "--resample",
        action="store_true",
        help="keep a subject's files on another grid; the cache resamples them onto the "
        "reference modality's grid (default: reject them)",
    )
    p.add_argument("--reference", help="reference modality (default: first by name)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_index)

    p = dsub.add_parser("cache", help="preprocess a manifest into a memory-mapped cache")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--preset", default="mri", help="ct | mri | none, or per modality: T1w=mri,CT=ct"
    )
    p.add_argument("--spacing", type=float, default=1.5, help="target isotropic spacing (mm)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument(
        "--modalities",
        help="comma-separated channels of the cache, in order (default: every modality); "
        "e.g. T1w for a single-modality recipe",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cache)
