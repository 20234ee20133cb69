"""What every ``anatomap`` sub-command shares: the help format (every default shown), the
``--quiet`` flag, and the inference options (``--device``, ``--precision``, ``--window``,
``--overlap``, ``--batch-size``), declared once so that they read the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEVICE_HELP = "auto (a CUDA GPU, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps"


class DefaultsFormatter(argparse.HelpFormatter):
    """Help lines end with ``(default: VALUE)`` wherever an option has a default worth saying
    (not None, False or empty) and its help does not state one already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        quiet = default is None or default is False or default in ("", [], ())
        if quiet or default is argparse.SUPPRESS or "(default: " in text:
            return action.help
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser class of every ``anatomap`` command and sub-command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def add_quiet(p: argparse.ArgumentParser, what: str = "no progress bars") -> None:
    """``--quiet``, which every command accepts (results are still printed)."""
    p.add_argument("--quiet", action="store_true", help=what)


def add_device(p: argparse.ArgumentParser) -> None:
    """``--device`` (checked before any work: an unavailable device is one error line)."""
    p.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)


def add_point_options(p: argparse.ArgumentParser) -> None:
    """The template and its points, as ``match`` and ``view`` read them."""
    p.add_argument(
        "--template", type=Path, required=True, metavar="SCAN", help="scan or saved embedding"
    )
    p.add_argument(
        "--points",
        type=Path,
        required=True,
        metavar="FILE",
        help="CSV (name,x,y,z or i,j,k) or 3D Slicer markups (.mrk.json, .fcsv)",
    )
    p.add_argument("--voxel", action="store_true", help="points are template voxel indices")
    p.add_argument(
        "--coords",
        type=str.upper,
        choices=("RAS", "LPS"),
        default="RAS",
        help="world frame of a points CSV's x,y,z (Slicer files state their own)",
    )
    p.add_argument(
        "--low-score",
        type=float,
        default=0.5,
        metavar="S",
        help="flag matches scoring below this (calibrated models flag P(within 5 mm) < 0.5)",
    )


def add_embedding_options(p: argparse.ArgumentParser) -> None:
    """How scans are embedded: sliding window, batch of windows, device, precision."""
    p.add_argument(
        "--window",
        type=int,
        default=64,
        metavar="N",
        help="sliding-window edge in voxels (rounded down to the encoder's largest stride)",
    )
    p.add_argument(
        "--overlap", type=float, default=0.25, metavar="F", help="window overlap, in [0, 1)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=2,
        metavar="N",
        help="windows per forward pass (more: faster on a GPU, more memory)",
    )
    add_device(p)
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: bf16 autocast on CUDA, fp32 elsewhere",
    )


def embedding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``anatomap.embed`` / ``anatomap.match`` from the options."""
    return {
        "window": args.window,
        "overlap": args.overlap,
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "progress": not args.quiet,
    }


def check_device(name: str) -> str:
    """``name`` if it is a device this machine has (else one error line naming it)."""
    from anatomap.infer.embed import resolve_device

    resolve_device(name)
    return name
