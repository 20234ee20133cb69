"""``anatomap data index`` and ``anatomap data cache``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anatomap.cli.options import add_quiet
from anatomap.cli.report import OK, REJECTED
from anatomap.errors import AnatomapError

# the names of anatomap.data.layouts.LAYOUT_NAMES (not imported: the parser stays light)
LAYOUT_CHOICES = ("auto", "bids", "nnunet", "msd", "dicom", "folder-per-subject", "flat")


def cmd_index(args: argparse.Namespace) -> int:
    from anatomap.data.manifest import index_directory, write_manifest
    from anatomap.data.summary import summary_lines
    from anatomap.data.walk import display

    if args.dir is None and args.table is None:
        raise AnatomapError("data index needs a folder to scan or --table CSV")
    if args.out is None and not args.dry_run:
        raise AnatomapError("data index needs --out manifest.jsonl (or --dry-run)")
    root = args.dir if args.dir is not None else args.table.parent
    result = index_directory(
        root,
        table=args.table,
        expect_ndim=args.ndim,
        progress=not args.quiet,
        resample=args.resample,
        reference=args.reference,
        layout=args.layout,
        derivatives=args.derivatives,
    )
    if not args.dry_run:
        write_manifest(result, args.out)
    for s in result.subjects:
        for what, why in s.resampled.items():
            print(f"resampled onto {s.reference}: {s.subject} {what}: {why}", file=sys.stderr)
    for p in result.problems:
        print(display(f"rejected: {p.path}: {p.reason}"), file=sys.stderr)
    for line in summary_lines(result):
        print(display(line))  # names that are not UTF-8 print as \xNN
    where = "(dry run: nothing written)" if args.dry_run else f"into {display(args.out)}"
    print(
        f"indexed {len(result.subjects)} subjects {where}; "
        f"{len(result.problems)} file(s) rejected, {len(result.skipped)} skipped"
    )
    return REJECTED if result.problems else OK


def cmd_cache(args: argparse.Namespace) -> int:
    from anatomap.data.cache import build_cache
    from anatomap.data.parallel import default_workers

    if args.workers < 0:
        raise AnatomapError("--workers must be a number of processes (0: every core)")

    res = build_cache(
        args.manifest,
        args.out,
        preset=args.preset,
        spacing=args.spacing,
        dtype=args.dtype,
        progress=not args.quiet,
        modalities=args.modalities.split(",") if args.modalities else None,
        workers=args.workers or default_workers(),
    )
    for p in res.problems:
        print(f"rejected: subject {p['subject']}: {p['reason']}", file=sys.stderr)
    print(
        f"cache {args.out}: {len(res.cache)} subjects ({res.built} built, {res.reused} reused), "
        f"{len(res.problems)} rejected"
    )
    return REJECTED if res.problems else OK


def _add_data(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap data index`` and ``anatomap data cache``."""
    data = sub.add_parser("data", help="index and cache scans")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("index", help="find and validate scans; write a JSONL manifest")
    p.add_argument("dir", type=Path, nargs="?", help="folder to scan (not needed with --table)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="manifest.jsonl to write (rejected files: <stem>.problems.jsonl beside it)",
    )
    p.add_argument("--table", type=Path, help="CSV subject,modality,path[,kind] instead of names")
    p.add_argument(
        "--layout",
        default="auto",
        choices=LAYOUT_CHOICES,
        help="how the folder is laid out (auto: detected, and printed)",
    )
    p.add_argument(
        "--derivatives", action="store_true", help="BIDS: index derivatives/ too (masks, ...)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be indexed; write nothing"
    )
    p.add_argument("--ndim", type=int, default=3, choices=(2, 3), help="expected dimensionality")
    p.add_argument(
        "--resample",
        action="store_true",
        help="keep a subject's files on another grid; the cache resamples them onto the "
        "reference modality's grid (default: reject them)",
    )
    p.add_argument("--reference", help="reference modality (default: first by name)")
    add_quiet(p)
    p.set_defaults(func=cmd_index)

    p = dsub.add_parser("cache", help="preprocess a manifest into a memory-mapped cache")
    p.add_argument("manifest", type=Path, help="manifest.jsonl from data index")
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="cache folder (created or updated)"
    )
    p.add_argument(
        "--preset", default="mri", help="ct | mri | none, or per modality: T1w=mri,CT=ct"
    )
    p.add_argument("--spacing", type=float, default=1.5, help="target isotropic spacing (mm)")
    p.add_argument(
        "--dtype", default="float16", choices=("float16", "float32"), help="image array type"
    )
    p.add_argument(
        "--modalities",
        help="comma-separated channels of the cache, in order (default: every modality); "
        "e.g. T1w for a single-modality recipe",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes building subjects in parallel (0: every core)",
    )
    add_quiet(p)
    p.set_defaults(func=cmd_cache)
    _add_synth(dsub)


def cmd_synth(args: argparse.Namespace) -> int:
    from anatomap.config import apply_overrides, read_yaml
    from anatomap.data.synth import LabelSource, SynthConfig, write_synth_cohort
    from anatomap.validation import validate_model

    def config(path: Path | None, overrides: list[str]) -> SynthConfig:
        source = str(path) if path else "synth config"
        tree = apply_overrides(read_yaml(path) if path else {}, overrides, source)
        return validate_model(SynthConfig, tree, source)

    if args.labels:
        source = LabelSource.from_files(
            args.labels, image=args.image, landmarks=args.landmarks, spacing=args.label_spacing
        )
    else:
        source = LabelSource.brain(args.landmark_set)
    res = write_synth_cohort(
        args.out,
        args.n,
        source,
        config(args.config, args.overrides),
        seed=args.seed,
        n_heldout=args.heldout,
        held_out_contrasts=[c for c in args.held_out_contrasts.split(",") if c],
        heldout_config=config(args.heldout_config, []) if args.heldout_config else None,
        modality=args.modality,
        progress=not args.quiet,
    )
    print(
        f"synthetic cohort {res.root}: {len(res.subjects)} subjects ({res.written} written, "
        f"{res.reused} reused), {len(res.heldout)} held out (splits.csv); next: "
        f"anatomap data index {res.root} --out {res.root / 'manifest.jsonl'}"
    )
    return OK


def _add_synth(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap data synth``."""
    p = dsub.add_parser(
        "synth", help="write a domain-randomised synthetic cohort from label maps (SynthSeg)"
    )
    p.add_argument("out", type=Path, help="folder to write (images/ labels/ landmarks/ params/)")
    p.add_argument("overrides", nargs="*", help="SynthConfig key=value, e.g. svf_max_mm=[12,6]")
    p.add_argument("--n", type=int, default=100, help="number of subjects")
    p.add_argument("--heldout", type=int, default=0, help="the last N subjects are held out")
    p.add_argument(
        "--held-out-contrasts",
        default="",
        help="comma-separated families only held-out subjects get, e.g. t2,pd,flair,ct",
    )
    p.add_argument("--config", type=Path, help="YAML of SynthConfig fields")
    p.add_argument("--heldout-config", type=Path, help="SynthConfig YAML for held-out subjects")
    p.add_argument(
        "--labels",
        nargs="+",
        help="label map, folder of binary masks (TotalSegmentator) or mask files; "
        "default: the MNI152 brain",
    )
    p.add_argument("--image", help="real intensities on the label maps' grid")
    p.add_argument("--landmarks", help="name,x,y,z CSV (default: one point per structure)")
    p.add_argument("--label-spacing", type=float, help="resample the label maps first (mm)")
    p.add_argument(
        "--landmark-set",
        default="dosenbach",
        choices=("dosenbach", "power"),
        help="brain landmark set (without --labels)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--modality", default="synth", help="image modality name in file names")
    add_quiet(p)
    p.set_defaults(func=cmd_synth)
