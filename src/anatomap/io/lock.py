"""One writer per folder: a lock file that a second writer finds taken, and says so at once.

:func:`folder_lock` takes ``FOLDER/.anatomap.lock`` with ``flock`` (released by the kernel
when the holder exits, even after ``kill -9``; NFSv4, GPFS and Lustre mounted with ``flock``
carry it across nodes). Where the filesystem has no ``flock``, it falls back to git's way: a
``.anatomap.lock.pid`` file created with ``O_EXCL``, removed on release, and taken over when
the process it names (same host) is gone. The lock file says who holds it (host, pid, time,
command), so the second writer's message names the first one.

``data cache`` locks its cache folder and ``pretrain`` its run folder (rank 0 only:
:func:`main_process`); readers never lock.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from anatomap.errors import AnatomapError
from anatomap.io.atomic import reason

LOCK_NAME = ".anatomap.lock"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "OMPI_COMM_WORLD_RANK")
F = TypeVar("F", bound=Callable[..., Any])


class LockError(AnatomapError):
    """Another process is writing to the folder (names the folder and the holder)."""


def main_process() -> bool:
    """Whether this process is rank 0 of its job (or the only process): the one that takes a
    run folder's lock. Lightning, torchrun, SLURM and MPI set the rank variables read."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return False
    return True


def _holder() -> str:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
    )


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _busy(folder: Path, what: str, lock: Path, hint: str = "") -> LockError:
    return LockError(
        f"{folder}: this {what} is being written by {_describe(lock)}; wait for it to finish "
        f"or use another folder{hint}"
    )


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _exclusive(folder: Path, what: str) -> Path:
    """The ``O_EXCL`` fallback: create ``.anatomap.lock.pid``; take over a dead holder's."""
    path = folder / (LOCK_NAME + ".pid")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                info = json.loads(path.read_text(encoding="utf-8"))
                stale = info["host"] == socket.gethostname() and not pid_alive(int(info["pid"]))
            except (OSError, ValueError, KeyError, TypeError):
                stale = False
            if not stale:
                hint = f" (if that process is gone, remove {path})"
                raise _busy(folder, what, path, hint) from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_holder())
        return path
    raise _busy(folder, what, path)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Hold the write lock of ``folder`` (created if needed) for the ``with`` block; raise
    :class:`LockError` at once when another process holds it."""
    import fcntl

    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise LockError(f"{folder}: cannot create the lock file ({exc.strerror})") from None
    fallback: Path | None = None
    acquired = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(folder, what, folder / LOCK_NAME) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise LockError(f"{folder}: cannot lock ({exc.strerror})") from None
            fallback = _exclusive(folder, what)
        acquired = True
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder().encode(), 0)
        except OSError as exc:
            raise LockError(
                f"{folder / LOCK_NAME}: cannot write the lock file ({reason(exc)})"
            ) from None
        yield folder / LOCK_NAME
    finally:
        if fallback is not None:
            fallback.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a new folder that got nothing: tidy up
            if acquired and created and os.listdir(folder) == [LOCK_NAME]:
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds_lock(folder_of: Callable[..., str | Path], what: str) -> Callable[[F], F]:
    """Decorator: run the function holding the lock of ``folder_of(*args, **kwargs)`` (in the
    main process only; other ranks of a distributed job run without it)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if not main_process():
                return fn(*args, **kwargs)
            with folder_lock(folder_of(*args, **kwargs), what):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
