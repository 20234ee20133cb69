"""The ``anatomap`` command: data index | data cache | data synth | pretrain | mine |
evaluate | embed | match | view | demo | benchmark | export | list | models.

Every sub-command calls the Python API (``anatomap.api``); each lives in the module of its
kind (``data``, ``train``, ``infer``, ``evaluate``) as ``cmd_<name>`` + ``_add_<name>``.
Every failure is printed as one line (``anatomap: error: FILE: problem``) by the one
top-level handler, :func:`anatomap.cli.report.run_command`, whose exit codes are documented
there and in docs/usage.md: 0 ok, 1 some inputs rejected, 2 bad input or usage, 3 I/O
failure, 4 out of memory, 70 internal error, 130 interrupted, 141 broken pipe. ``--debug``
adds tracebacks.
Every sub-command takes ``--quiet``, and its ``--help`` shows every default
(:mod:`anatomap.cli.options`).
"""

from __future__ import annotations

import argparse

from anatomap.cli.data import _add_data
from anatomap.cli.evaluate import _add_evaluate, _add_list
from anatomap.cli.infer import _add_embed, _add_export, _add_match
from anatomap.cli.models import _add_models
from anatomap.cli.options import Parser
from anatomap.cli.report import BAD_INPUT, OK, run_command
from anatomap.cli.train import _add_benchmark, _add_demo, _add_mine, _add_pretrain
from anatomap.cli.view import _add_view

_COMMANDS = (
    _add_data,
    _add_pretrain,
    _add_mine,
    _add_evaluate,
    _add_embed,
    _add_match,
    _add_view,
    _add_demo,
    _add_benchmark,
    _add_export,
    _add_list,
    _add_models,
)
"""One function per sub-command, in the order ``anatomap --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``anatomap`` argument parser: one sub-parser per command."""
    parser = Parser(prog="anatomap", description="Self-supervised anatomical position learning.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an error (and warning origins)"
    )
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand on either side of options (``pretrain CFG --resume a=1 b=2``).
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # also accepted after the sub-command
        extra = [e for e in extra if e != "--debug"]
        args.debug = True
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from anatomap import __version__

        print(__version__)
        return OK
    if not getattr(args, "func", None):
        parser.print_help()
        return BAD_INPUT
    return run_command(args.func, args)
