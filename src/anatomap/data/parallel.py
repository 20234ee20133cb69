"""Run one function per item in worker processes, so that one bad item never stops the rest.

:func:`run_each` keeps at most ``workers`` items in flight (memory stays bounded by the
workers, not by the queue). On Linux workers are forked, as PyTorch's DataLoader workers
are: they start at once with the caller's modules (a fresh interpreter would spend seconds
importing torch and MONAI per worker), and run with one torch / ITK thread each, which also
keeps OpenMP from being used across the fork. Elsewhere they come from a ``forkserver``
that has imported the function's module once. When a worker process dies (killed for
memory, a crash in a C library), the items it may have been running are retried one at a
time in a fresh process; the one that dies again gets :class:`Failed` and the others their
result.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

DIED = "its worker process died (killed by the system, e.g. out of memory, or crashed)"


@dataclass
class Failed:
    """An item whose worker process died, or whose function raised (the reason)."""

    reason: str


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _init_worker(umask: int) -> None:
    """The caller's umask (files get the same modes as in-process), and one thread per
    worker process: the workers are the parallelism."""
    os.umask(umask)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    except (ImportError, AttributeError):  # pragma: no cover
        pass


def _context(fn: Callable[[Any], Any]) -> Any:
    """Fork on Linux (fast start); a forkserver that preloads ``fn``'s module elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        ctx.set_forkserver_preload([fn.__module__])
    return ctx


def _one_pass(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    order: list[int],
    workers: int,
    results: list[Any],
    done: Callable[[int], None],
) -> tuple[list[int], list[int]]:
    """Run ``order`` on a fresh pool; returns (items in flight when it broke, items never
    submitted). Both are empty when every item finished."""
    ctx = _context(fn)
    pending = iter(order)
    inflight: dict[Future, int] = {}
    mask = os.umask(0)
    os.umask(mask)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(mask,))
    try:
        for i in itertools.islice(pending, workers):
            inflight[pool.submit(fn, items[i])] = i
        while inflight:
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for f in finished:
                i = inflight.pop(f)
                try:
                    results[i] = f.result()
                except BrokenProcessPool:
                    inflight[f] = i
                    raise
                except Exception as exc:  # the function itself raised: this item only
                    results[i] = Failed(f"{type(exc).__name__}: {exc}")
                done(i)
                nxt = next(pending, None)
                if nxt is not None:
                    inflight[pool.submit(fn, items[nxt])] = nxt
    except BrokenProcessPool:
        pool.shutdown(wait=True, cancel_futures=True)
        return sorted(inflight.values()), list(pending)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [], []


def run_each(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int,
    done: Callable[[int], None] | None = None,
) -> list[Any]:
    """``[fn(item) for item in items]`` in ``workers`` processes (in this process when
    ``workers`` is 1 or there is one item). ``fn`` must be a module-level function; an item
    whose worker dies or whose call raises gets :class:`Failed`. ``done(i)`` is called as
    each item finishes (progress bars)."""
    report = done or (lambda i: None)
    results: list[Any] = [None] * len(items)
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = fn(item)
            report(i)
        return results
    todo, suspects = list(range(len(items))), []
    while todo:
        broken, todo = _one_pass(fn, items, todo, min(workers, len(todo)), results, report)
        suspects += broken
    for i in suspects:  # alone in a fresh process: the item that kills it is the culprit
        if _one_pass(fn, items, [i], 1, results, report)[0]:
            results[i] = Failed(DIED)
            report(i)
    return results
