"""Third-party diagnostics (ITK/GDCM, pydicom, numpy) as one-line warnings naming the input.

While a reader holds a file (:func:`reading`), ITK's and pydicom's log messages become
Python warnings of category :class:`InputWarning` whose text is ``FILE: message`` on one
line, and :func:`current_input` names that file, so the CLI can attribute any other warning
(numpy's, pydicom's) raised meanwhile. Nothing is printed here: the CLI prints each distinct
warning once (``anatomap: warning: FILE: message``).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

_CURRENT: ContextVar[str | None] = ContextVar("anatomap_input", default=None)
_INSTALLED: dict[str, Any] = {}
_FAILED: list[str] = []  # the input whose read raised last (for the CLI's error line)


class InputWarning(UserWarning):
    """A library's warning about an input file (text: ``FILE: message``, one line)."""


def one_line(text: str, limit: int = 240) -> str:
    """ITK's ``WARNING: In /path/x.hxx, line N\\nClass (0x..): message`` -> ``message``."""
    text = re.sub(r"^\s*(WARNING|ERROR):\s*In\s+\S+,\s*line\s+\d+\s*", "", text, flags=re.I)
    text = re.sub(r"^\s*\w+\s*\(0x[0-9a-fA-F]+\):\s*", "", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def current_input() -> str | None:
    """The file a reader of this thread holds now, if any."""
    return _CURRENT.get()


def failed_input() -> str | None:
    """The input whose read raised most recently (``None`` when none did)."""
    return _FAILED[-1] if _FAILED else None


def note(text: str, source: str = "ITK") -> None:
    """Warn about the current input (``FILE: text``; ``SOURCE: text`` outside a read) with
    :class:`InputWarning`."""
    where = _CURRENT.get() or source
    msg = one_line(text)
    if msg:
        warnings.warn(f"{where}: {msg}", InputWarning, stacklevel=3)


class _PydicomBridge(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        note(record.getMessage(), "pydicom")


def install() -> None:
    """Route ITK's and pydicom's messages to :func:`note` (once per process)."""
    if _INSTALLED:
        return
    _INSTALLED["done"] = True
    log = logging.getLogger("pydicom")
    bridge = _PydicomBridge(logging.WARNING)
    log.addHandler(bridge)
    log.propagate = False
    _INSTALLED["pydicom"] = bridge
    try:
        import SimpleITK as sitk

        class _ItkBridge(sitk.LoggerBase):  # type: ignore[misc, name-defined]
            def DisplayText(self, t: str) -> None:
                note(t)

            def DisplayErrorText(self, t: str) -> None:
                note(t)

            def DisplayWarningText(self, t: str) -> None:
                note(t)

            def DisplayGenericOutputText(self, t: str) -> None:
                note(t)

            def DisplayDebugText(self, t: str) -> None:
                pass

        itk = _ItkBridge()
        itk.SetAsGlobalITKLogger()
        _INSTALLED["itk"] = itk  # the C++ side keeps a pointer: keep the object alive
    except (ImportError, AttributeError, TypeError):  # an old SimpleITK: ITK prints itself
        pass


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Attribute third-party diagnostics raised in this block to ``path``."""
    install()
    token = _CURRENT.set(str(path))
    try:
        yield
    except BaseException:
        _FAILED[:] = [str(path)]
        raise
    finally:
        _CURRENT.reset(token)
