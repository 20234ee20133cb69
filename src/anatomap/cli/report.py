"""The CLI's one top-level handler: every failure is one line on stderr with an exit code.

=====  ===============================================================================
code   meaning
=====  ===============================================================================
0      success
1      finished, but some inputs were rejected (listed on stderr)
2      bad input or usage: an anatomap error naming the file (or key) and the problem;
       argument errors; input the code did not expect (ValueError, KeyError, Unicode,
       nesting too deep)
3      I/O failure: the disk or the filesystem refused (full, read-only, permission,
       name too long, a file where a folder is needed...)
4      out of memory
70     internal error (a bug: please report it; ``--debug`` shows the traceback)
130    interrupted (Ctrl-C)
141    the reader of the output went away (``anatomap ... | head``); nothing is printed
=====  ===============================================================================

Every command returns these constants (``OK``, ``REJECTED``, ...), never other numbers.

Warnings from libraries (ITK, pydicom, numpy, Lightning) are printed once each, as
``anatomap: warning: FILE: message`` when they concern an input being read. ``--debug``
adds the traceback of an error and the origin of each warning.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

from anatomap.errors import AnatomapError
from anatomap.io.atomic import disk_full
from anatomap.io.notes import InputWarning, current_input, failed_input, install, one_line

OK, REJECTED, BAD_INPUT, IO_FAILURE, OUT_OF_MEMORY, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 4, 70, 130
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it
_INPUT_ERRORS = (ValueError, KeyError, IndexError, UnicodeError, RecursionError, OverflowError)


def _origin(filename: str) -> str:
    """The package a warning came from (``numpy``, ``lightning``), from its source file."""
    m = re.search(r"site-packages[\\/]+([A-Za-z_][\w]*)", filename)
    return m.group(1) if m else (filename.rsplit("/", 1)[-1].removesuffix(".py") or "python")


@contextmanager
def reported_warnings(debug: bool = False) -> Iterator[None]:
    """Print each distinct warning once, in one line, while the block runs."""
    seen: set[str] = set()

    def show(message: Any, category: type, filename: str, lineno: int, *_: Any) -> None:
        text = one_line(str(message))
        if not issubclass(category, InputWarning):
            where = current_input() or _origin(filename)
            text = text if text.startswith(where) else f"{where}: {text}"
        if debug:
            text += f" [{category.__name__} at {filename}:{lineno}]"
        if text not in seen:
            seen.add(text)
            tqdm.write(f"anatomap: warning: {text}", file=sys.stderr)  # above any progress bar

    install()
    with warnings.catch_warnings():
        warnings.showwarning = show  # restored by catch_warnings
        yield


def _where(exc: BaseException) -> str:
    """``FILE: `` for an error that names no file itself: its OSError filename, or the input
    being read when it was raised."""
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    name = name or failed_input()
    return f"{name}: " if name else ""


def classify(exc: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception that reached the top."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, "interrupted"
    if isinstance(exc, AnatomapError):
        return int(getattr(exc, "exit_code", BAD_INPUT)), one_line(str(exc), 2000)
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return OUT_OF_MEMORY, f"{_where(exc)}out of memory ({type(exc).__name__})"
    if isinstance(exc, OSError) or disk_full(exc):
        cause = "no space left on device" if disk_full(exc) else (exc.strerror or str(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            cause = "file name too long"
        return IO_FAILURE, f"{_where(exc)}{cause}"
    if isinstance(exc, RecursionError):
        return BAD_INPUT, f"{_where(exc)}input nested too deeply (RecursionError)"
    text = one_line(str(exc)) or "(no message)"
    if isinstance(exc, _INPUT_ERRORS):
        return BAD_INPUT, f"{_where(exc)}{type(exc).__name__}: {text}"
    return INTERNAL, f"internal error: {type(exc).__name__}: {text}"


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a sub-command under the handler: one line and an exit code for any failure."""
    debug = bool(getattr(args, "debug", False))
    try:
        with reported_warnings(debug):
            return int(func(args))
    except BrokenPipeError:  # `anatomap ... | head`: the reader left, nothing to report
        return BROKEN_PIPE
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        code, message = classify(exc)
        if debug:
            traceback.print_exc(file=sys.stderr)
        hint = " (run with --debug for the traceback; please report it)" if code == INTERNAL else ""
        print(
            f"anatomap: {'' if code == INTERRUPTED else 'error: '}{message}{hint}", file=sys.stderr
        )
        return code
