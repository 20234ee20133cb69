"""Where and how inference runs: device names, autocast precision, model memory format.

Shared by :mod:`anatomap.infer.embed` and :mod:`anatomap.infer.match` (and the API / CLI,
which validate a user's choice before any scan is read). Every bad value is one
:class:`~anatomap.errors.AnatomapError` line naming the option.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

import torch

from anatomap.errors import AnatomapError

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""``precision`` name -> autocast dtype (``None``: plain float32); ``auto`` picks one."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device for ``name``: ``auto`` (CUDA if available, else MPS if available,
    else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. A device this machine lacks is one
    error line saying so."""
    text = str(name).strip().lower() if isinstance(name, str | torch.device) else None
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    m = re.fullmatch(r"(cpu|mps)|cuda(?::(\d+))?", text or "")
    if m is None:
        raise AnatomapError(f"device {name!r}: must be {DEVICES}")
    if m.group(1) == "mps" and not _mps_available():
        raise AnatomapError(f"device {name!r}: MPS (Apple GPU) is not available here")
    if m.group(1):
        return torch.device(m.group(1))
    if not torch.cuda.is_available():
        why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU visible"
        raise AnatomapError(f"device {name!r}: CUDA is not available here ({why}); use cpu")
    n = torch.cuda.device_count()
    if m.group(2) is not None and int(m.group(2)) >= n:
        raise AnatomapError(f"device {name!r}: this machine has {n} CUDA device(s), 0 to {n - 1}")
    return torch.device(text)  # type: ignore[arg-type]


def resolve_precision(name: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None``: float32, no autocast).
    ``auto`` is bf16 on CUDA (fp16 on GPUs without bf16) and fp32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not isinstance(name, str) or name not in PRECISIONS:
        raise AnatomapError(f"precision {name!r}: must be auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision for the forward passes on ``device`` (nothing for ``dtype=None``)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def at_most_threads(n: int) -> Iterator[None]:
    """Run with at most ``n`` intra-op CPU threads (torch's count restored after). For many
    small, memory-bound operations: each multi-threaded one ends in a barrier, and on a busy
    CPU a descheduled thread makes every barrier wait. Measured on 2 shared cores, matching
    with 2 threads was 10-50x slower than with 1; on 2 idle cores, 1.2-1.4x faster."""
    old = torch.get_num_threads()
    if old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def small_op_threads(override: int | None = None) -> int:
    """Threads for many small CPU operations: ``override``, or half of torch's (at least 1).

    Each multi-threaded operation ends in a barrier that waits for any descheduled thread.
    Measured for the match refinement on 2 cores, 264 / 2,000 points: 1 thread 0.11 / 0.88 s,
    2 threads 0.08 / 0.60 s on idle cores, but 0.13 / 0.76 s against 0.31 / 1.92 s with one
    core busy; half the cores keeps most of the gain on large machines and room for other
    work."""
    if override is not None:
        return max(1, int(override))
    return max(1, torch.get_num_threads() // 2)


def memory_format(channels_last: bool) -> torch.memory_format:
    """``channels_last_3d`` (NDHWC: faster 3-D convolutions on GPUs and oneDNN) or the
    default contiguous layout."""
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def float32_rows(fmap: torch.Tensor, device: torch.device, chunk_bytes: int) -> torch.Tensor:
    """A map ``[D, *s]``'s voxel rows ``[prod(s), D]`` as float32 on ``device``: a view of a
    float32 voxel-major map on the CPU, else upcast and copied one slab of the first axis at
    a time (at most ``chunk_bytes`` of float32 at once, whatever the map's dtype and layout)."""
    d, x = fmap.shape[0], fmap.shape[1]
    if fmap.dtype == torch.float32 and device.type == "cpu":
        return fmap.permute(1, 2, 3, 0).reshape(-1, d).contiguous()
    per_x = math.prod(fmap.shape[2:])
    rows = torch.empty(x * per_x, d, device=device)
    step = max(1, chunk_bytes // (4 * d * per_x))
    for s in range(0, x, step):
        slab = fmap[:, s : s + step].permute(1, 2, 3, 0).reshape(-1, d)
        rows[s * per_x : s * per_x + len(slab)].copy_(slab)
    return rows
