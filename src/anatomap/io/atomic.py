"""Atomic writes: the one helper every writer of anatomap goes through.

A file (or folder) is written under a temporary name in its destination folder, flushed to
disk, then moved into place with :func:`os.replace`. A reader never sees a half-written
file, the previous version survives any failure (disk full, kill -9, an exception in the
writer), and the temporary file is removed on every failure. New files get the user's umask
(0644 under umask 022), not :func:`tempfile.mkstemp`'s 0600, so colleagues on a shared
filesystem can read them.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from anatomap.errors import AnatomapError


class WriteError(AnatomapError):
    """A file could not be written (names the file and the cause; the previous one is intact)."""

    exit_code = 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FULL_TEXTS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk or the quota is full, whatever the
    library that raised it (safetensors, ITK and nibabel wrap the OSError in their own)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def reason(exc: BaseException) -> str:
    """A short cause for an exception, naming a full disk as such."""
    if disk_full(exc):
        return "no space left on device"
    if isinstance(exc, OSError) and exc.strerror:
        if exc.errno in (errno.EEXIST, errno.ENOTDIR) and exc.filename:
            return f"{exc.strerror}: {exc.filename}"  # a file where a folder is needed
        return exc.strerror
    return str(exc) or type(exc).__name__


def _remove_mine(path: Path, tmp: Path) -> None:
    """Remove ``tmp`` and what a writer made beside it under this process's temporary stem
    for ``path`` (ITK's ``.raw`` beside a ``.mhd``, numpy's added ``.npy``), file or folder."""
    stem = temp_name(path).name
    try:
        found = [tmp, *tmp.parent.glob(f"{glob.escape(stem)}*")]
    except OSError:
        found = [tmp]
    for p in found:
        if p != tmp and p.name[len(stem) :][:1].isdigit():
            continue  # another process's (its pid only starts like ours)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:  # the folder itself is unusable: nothing was left in it
            pass


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (or a file's data) to disk (best effort: not every
    filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` and flush it to disk (no rename: callers do that)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def temp_name(path: Path, suffix: str = "") -> Path:
    """The temporary sibling of ``path`` this process writes (``.<name>.tmp<pid><suffix>``)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def remove_stale(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by killed writers (not this process's)."""
    mine = f".{path.name}.tmp{os.getpid()}"
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        if not stale.name.startswith(mine):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(
    path: str | Path,
    suffix: str = "",
    *,
    what: str = "file",
    error: type[AnatomapError] = WriteError,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, move it into place.

    ``suffix`` keeps a writer that picks its format from the name happy (``.nii.gz``,
    ``.npy``). On any failure the temporary file is removed and the previous ``path`` is
    untouched; an :class:`OSError` becomes ``error`` naming the file and the cause.
    """
    path = Path(path)
    tmp = temp_name(path, suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, 0o666 & ~_umask())
            fsync_dir(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        _remove_mine(path, tmp)
        if isinstance(exc, OSError) or disk_full(exc):
            err = error(
                f"{path}: could not write {what} ({reason(exc)}); the previous one is intact"
            )
            err.exit_code = 3  # an I/O failure (anatomap.cli)
            raise err from None
        raise


def atomic_write_bytes(
    path: str | Path,
    data: bytes | memoryview,
    *,
    what: str = "file",
    error: type[AnatomapError] = WriteError,
) -> Path:
    """Write ``data`` to ``path`` atomically (synced temporary file + rename)."""
    with atomic_path(path, what=what, error=error) as tmp:
        write_synced(tmp, data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, what: str = "file") -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), what=what)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (standard JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any, *, what: str = "file") -> Path:
    """Write standard JSON to ``path`` atomically (non-finite floats become ``null``)."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False)
    return atomic_write_text(path, text, what=what)


def atomic_write_lines(path: str | Path, lines: Iterable[str], *, what: str = "file") -> Path:
    """Write one line per item to ``path`` atomically (streamed, not held in memory)."""
    with atomic_path(path, what=what) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        for line in lines:
            fh.write(line + "\n")
    return Path(path)


@contextmanager
def atomic_folder(
    path: str | Path, *, what: str = "folder", error: type[AnatomapError] = WriteError
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path``.

    An existing ``path`` is swapped out only after the new folder is complete. On any failure
    the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_name(path)
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o777)
        yield tmp
        fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists() and old.exists():
            os.replace(old, path)
        if isinstance(exc, OSError) or disk_full(exc):
            err = error(
                f"{path}: could not write {what} ({reason(exc)}); the previous one is intact"
            )
            err.exit_code = 3  # an I/O failure (anatomap.cli)
            raise err from None
        raise
