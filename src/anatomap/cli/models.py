"""``anatomap models``: the models shipped in the package (usable by name wherever a
checkpoint is taken, e.g. ``anatomap match brain-mri ...``)."""

from __future__ import annotations

import argparse

from anatomap.cli.options import add_quiet
from anatomap.cli.report import OK


def cmd_models(args: argparse.Namespace) -> int:
    from anatomap.infer.zoo import shipped_models

    models = shipped_models()
    if not models:
        print("no shipped models in this installation")
        return OK
    width = max(len(m.name) for m in models)
    for m in models:
        size = f"{m.size_bytes / 2**20:.1f} MB"
        print(f"{m.name:<{width}}  {m.objective:<6} {size:>8}  {m.summary}")
        if args.verbose:
            print(f"{'':<{width}}  {m.path}  (card: {m.path / 'MODEL_CARD.md'})")
    return OK


def _add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap models``."""
    p = sub.add_parser("models", help="shipped models, usable by name as a checkpoint")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each folder")
    add_quiet(p, "accepted for uniformity (models prints no progress)")
    p.set_defaults(func=cmd_models)
