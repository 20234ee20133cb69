"""The ``anatomap`` command: data index | data cache | pretrain | mine | evaluate | embed |
match | demo | benchmark | export | list.

Every sub-command calls the Python API (``anatomap.api``); each lives in the module of its
kind (``data``, ``train``, ``infer``, ``evaluate``) as ``cmd_<name>`` + ``_add_<name>``.
Errors that anatomap raises on purpose are printed as one line (``anatomap: error: FILE:
problem``) with exit code 2; a command that finished but rejected some inputs exits with 1.
"""

from __future__ import annotations

import argparse
import sys

from anatomap.cli.data import _add_data
from anatomap.cli.evaluate import _add_evaluate, _add_list
from anatomap.cli.infer import _add_embed, _add_export, _add_match
from anatomap.cli.train import _add_benchmark, _add_demo, _add_mine, _add_pretrain
from anatomap.errors import AnatomapError

_COMMANDS = (
    _add_data,
    _add_pretrain,
    _add_mine,
    _add_evaluate,
    _add_embed,
    _add_match,
    _add_demo,
    _add_benchmark,
    _add_export,
    _add_list,
)
"""One function per sub-command, in the order ``anatomap --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``anatomap`` argument parser: one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="anatomap", description="Self-supervised anatomical position learning."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand on either side of options (``pretrain CFG --resume a=1 b=2``).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from anatomap import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except AnatomapError as exc:
        print(f"anatomap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anatomap: interrupted", file=sys.stderr)
        return 130
