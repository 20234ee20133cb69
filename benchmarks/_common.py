"""Helpers shared by the throughput benchmarks (crop_throughput, loader_overhead,
step_throughput, scaling): demo data on disk, machine line, Markdown tables, process-tree
memory, and writing a table between ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


# ---------------------------------------------------------------- output


def machine() -> str:
    """One line: CPU cores, OS, torch (and the GPU when CUDA is available)."""
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}, {platform.platform()}, torch {torch.__version__}"


def command() -> str:
    """The command line that reproduces this run (``--write`` left out)."""
    args = [a for a in sys.argv[1:] if a != "--write"]
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *args])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> list[str]:
    """Markdown table lines; ``align`` holds one ``l``/``r`` per column (default: first left,
    the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def publish(name: str, lines: Sequence[str], write: bool) -> None:
    """Print the block; with ``write``, replace (or append) it in docs/benchmarks.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = "\n".join([start, *lines, end])
    print(block, flush=True)
    if not write:
        return
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC}")


def met(value: float, target: float, higher_is_better: bool = True) -> str:
    """``yes`` / ``no (by x%)`` for a ratio target."""
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "yes"
    reached = value / target if higher_is_better else target / value
    return f"no ({reached:.0%} of the target)"


# ---------------------------------------------------------------- timing


def rate(fn: Callable[[], int], seconds: float = 0.0, calls: int = 1) -> float:
    """Items per second of ``fn`` (it returns how many items it produced), over ``calls``
    calls or at least ``seconds``."""
    t0 = time.perf_counter()
    n = done = 0
    while done < calls or time.perf_counter() - t0 < seconds:
        n += fn()
        done += 1
    return n / (time.perf_counter() - t0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- memory


def _proc_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@dataclass
class TreeMemory:
    """Samples the memory of this process and its children (DataLoader workers) every
    ``interval`` s in a thread; keeps the peaks of the sums, in MB.

    ``anon``: anonymous memory (RssAnon + RssShmem): what the loader allocates, independent of
    the page cache. ``rss``: total resident set (VmRSS), which also counts the file pages a
    process has mapped (the memory-mapped cache), so it moves with the page cache.
    """

    interval: float = 0.02
    anon: float = 0.0
    rss: float = 0.0
    fds: int = 0  # most file descriptors open in any one of the processes
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample(self) -> None:
        anon = rss = 0
        for pid in [os.getpid(), *_descendants(os.getpid())]:
            kb = _proc_kb(pid, ("RssAnon", "RssShmem", "VmRSS"))
            anon += kb["RssAnon"] + kb["RssShmem"]
            rss += kb["VmRSS"]
            with contextlib.suppress(OSError):
                self.fds = max(self.fds, len(os.listdir(f"/proc/{pid}/fd")))
        self.anon = max(self.anon, anon / 1024)
        self.rss = max(self.rss, rss / 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (``ru_maxrss``), MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hwm_mb(reset: bool = False) -> float:
    """This process's resident high-water mark (Linux ``VmHWM``), MB; ``reset`` first sets
    it to the current RSS, so a later call measures the peak of what ran in between."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- data


@dataclass
class DemoData:
    cache: Path
    subjects: list[str]
    seconds: dict[str, float]  # generation, index, cache, copies (only what was done now)


def demo_cache(
    folder: str | Path,
    n_subjects: int,
    spacing: float = 2.0,
    real: int | None = None,
    link: bool = False,
) -> DemoData:
    """A cache of ``n_subjects`` demo subjects under ``folder`` (reused when present).

    ``real``: generate only that many subjects with the demo generator and cache them; the
    others are copies of their cached images (distinct files, so they take their own disk
    and page-cache space; content does not change sampling cost). ``link``: hard links
    instead of copies (distinct names and memory maps, but one inode per generated subject:
    little disk, and the page cache does not grow with N). Without ``real`` every subject is
    generated. Label maps are not copied.
    """
    from anatomap.data.cache import Cache, build_cache
    from anatomap.data.demo import build_demo
    from anatomap.data.manifest import index_directory, write_manifest
    from anatomap.io.atomic import atomic_write_json

    root = Path(folder)
    n_real = min(n_subjects, real) if real else n_subjects
    seconds: dict[str, float] = {}
    base = root / f"demo_{n_real}_{spacing:g}mm"
    if not (base / "cache" / "cache.json").is_file():
        t0 = time.perf_counter()
        build_demo(base / "data", n_subjects=n_real, n_heldout=0, spacing=spacing, progress=False)
        t1 = time.perf_counter()
        result = index_directory(base / "data")
        write_manifest(result, base / "manifest.jsonl")
        t2 = time.perf_counter()
        build_cache(base / "manifest.jsonl", base / "cache", spacing=spacing, progress=False)
        seconds = {"generate": t1 - t0, "index": t2 - t1, "cache": time.perf_counter() - t2}
    if n_real == n_subjects:
        return DemoData(base / "cache", Cache(base / "cache").subjects, seconds)

    kind = "links" if link else "copies"
    out = root / f"{kind}_{n_subjects}_of_{n_real}_{spacing:g}mm"
    if not (out / "cache.json").is_file():
        t0 = time.perf_counter()
        src = Cache(base / "cache")
        names = []
        for i in range(n_subjects):
            sid = f"sub-{i:05d}"
            orig = src[src.subjects[i % n_real]]
            folder_i = out / "subjects" / sid
            folder_i.mkdir(parents=True, exist_ok=True)
            for name in ("image.npy", "foreground.npy"):
                if link:
                    os.link(orig.root / name, folder_i / name)
                else:
                    shutil.copyfile(orig.root / name, folder_i / name)
            meta = {**orig.meta, "subject": sid, "labels": []}
            atomic_write_json(folder_i / "meta.json", meta)
            names.append(sid)
        atomic_write_json(out / "cache.json", {**src.info, "subjects": names})
        seconds["copies"] = time.perf_counter() - t0
    return DemoData(out, Cache(out).subjects, seconds)


def disk_mb(path: Path, pattern: str = "*.npy") -> float:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern)) / 1e6


def gb(x_mb: float) -> str:
    return f"{x_mb / 1024:.2f}"


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, float)))


def dump(obj: object) -> str:
    return json.dumps(obj, sort_keys=True)


# ---------------------------------------------------------------- training steps


@dataclass
class Trainee:
    """A method's encoder + objective + AdamW, stepped the way ``PretrainModule`` is."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    cfg: object
    device: torch.device
    autocast: torch.dtype | None = None
    channels_last: bool = False
    step_count: int = 0

    def step(self, batch: dict) -> float:
        dev = self.device
        batch = {
            k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }
        m = self.module
        with torch.autocast(dev.type, self.autocast or torch.float32, self.autocast is not None):
            loss = m.objective(m.encoder, batch)["loss"]
        loss.backward()
        if self.cfg.trainer.grad_clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        m.objective.on_after_step(m.encoder, self.step_count, self.cfg.trainer.max_steps)
        self.step_count += 1
        return float(loss.detach())


def trainee(
    config: str, cache: Path, overrides: Sequence[str] = (), device: str = "cpu", **kw: object
) -> tuple[Trainee, torch.utils.data.DataLoader]:
    """The method of packaged config ``config`` on ``cache``, and the training DataLoader
    ``anatomap pretrain`` would build for it (``ViewDataModule``)."""
    from anatomap.api import load_config
    from anatomap.data.cache import Cache
    from anatomap.train.module import PretrainModule, ViewDataModule

    cfg = load_config(config, [f"data.cache={cache}", "output=unused", *overrides])
    c = Cache(cache)
    torch.manual_seed(0)
    module = PretrainModule(cfg, len(c.modalities)).to(device)
    if kw.get("channels_last"):
        module = module.to(memory_format=torch.channels_last_3d)
    if kw.get("compile"):
        module.encoder.compile()
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.trainer.lr)
    loader = ViewDataModule(cfg, c, c.subjects, module.objective.view_spec()).train_dataloader()
    t = Trainee(
        module, opt, cfg, torch.device(device), kw.get("autocast"), bool(kw.get("channels_last"))
    )  # type: ignore[arg-type]
    return t, loader
