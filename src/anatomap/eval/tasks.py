"""Evaluation tasks: a registry, and the context every task receives.

A task is a function ``(ctx) -> TaskResult`` registered with :func:`register_task`; it
returns metrics (JSON-able) and report sections. ``applies`` decides whether a task runs for
a given checkpoint (e.g. landmark matching needs dense embeddings; the gap-matrix view needs a
spatial_aware checkpoint). Tasks always compare against the same-architecture random encoder.

Where the networks run is the context's: :attr:`EvalContext.device` (the option ``device``:
auto, cpu, cuda, cuda:N, mps; auto takes a GPU when there is one) and
:meth:`EvalContext.autocast` (the option ``precision``; auto is bf16 autocast on CUDA only,
see :mod:`anatomap.infer.device`). Tasks run their networks through :meth:`EvalContext.embedder`
(or pass ``ctx.device`` on), move inputs there and bring outputs back to the CPU; on the CPU
nothing changes. Progress bars (tqdm, to stderr) come from :func:`progress_bar`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anatomap.checkpoint import LoadedCheckpoint
from anatomap.data.cache import Cache
from anatomap.eval.report import Section
from anatomap.infer.device import autocast, resolve_device, resolve_precision
from anatomap.models.encoders import Encoder, EncoderSpec, build_encoder
from anatomap.objectives.base import Objective
from anatomap.registry import Registry

Embedder = Callable[[torch.Tensor], torch.Tensor]


def progress_bar(
    iterable: Iterable[Any] | None = None, *, desc: str, enabled: bool, **kwargs: Any
) -> Any:
    """The evaluation's one progress style: a tqdm bar on stderr (``enabled=False``: none)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, disable=not enabled, **kwargs)


def embedder(
    encoder: Encoder,
    objective: Objective,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> Embedder:
    """``objective.embed(encoder, x)`` as a function of a CPU batch: both modules moved to
    ``device`` (once, here), ``x`` moved there, the forward pass under ``precision``'s autocast
    (auto: bf16 on CUDA only) without gradients, and the embedding back as float32 on the CPU."""
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    encoder.to(dev)
    objective.to(dev)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(dev, dtype):
            out = objective.embed(encoder, x.to(dev, non_blocking=True))
        return out.float().cpu()

    return run


@dataclass
class EvalContext:
    """What a task may use: the checkpoint, its objective, the cache and held-out subjects."""

    ckpt: LoadedCheckpoint
    objective: Objective
    cache: Cache
    subjects: list[str]
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    _random: Encoder | None = None
    _random_objective: Objective | None = None
    _device: torch.device | None = field(default=None, repr=False)

    @property
    def meta(self) -> dict[str, Any]:
        return self.ckpt.meta

    @property
    def encoder(self) -> Encoder:
        return self.ckpt.encoder

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec.from_dict(self.meta["encoder"])

    @property
    def name(self) -> str:
        return f"{self.meta['objective']} (pretrained)"

    @property
    def run_dir(self) -> Path:
        return self.ckpt.path.parent

    @property
    def device(self) -> torch.device:
        """Where the networks run: the option ``device`` (default auto; resolved once, an
        unavailable device is one error line)."""
        if self._device is None:
            self._device = resolve_device(self.options.get("device") or "auto")
        return self._device

    @property
    def precision(self) -> str:
        """The option ``precision`` (auto: bf16 autocast on CUDA, float32 elsewhere)."""
        return str(self.options.get("precision") or "auto")

    @property
    def progress(self) -> bool:
        """Whether tasks show progress bars (the option ``progress``)."""
        return bool(self.options.get("progress", False))

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision for forward passes on :attr:`device` (nothing on the CPU)."""
        return autocast(self.device, resolve_precision(self.precision, self.device))

    def to_device(self, *modules: nn.Module) -> None:
        """Move ``modules`` (in place) to :attr:`device`."""
        for m in modules:
            m.to(self.device)

    def embedder(self, encoder: Encoder, objective: Objective) -> Embedder:
        """:func:`embedder` on this context's device and precision."""
        return embedder(encoder, objective, device=self.device, precision=self.precision)

    def bar(self, iterable: Iterable[Any] | None = None, *, desc: str, **kwargs: Any) -> Any:
        """:func:`progress_bar` (nested under the task bar: cleared when done)."""
        return progress_bar(iterable, desc=desc, enabled=self.progress, leave=False, **kwargs)

    def random_encoder(self) -> Encoder:
        """The same architecture freshly initialised with the evaluation seed (cached)."""
        if self._random is None:
            self._random = random_encoder(self.spec, self.seed)
        return self._random

    def random_objective(self) -> Objective:
        """The objective's heads freshly initialised around :meth:`random_encoder`, so the
        untrained baseline embeds crops the same way as the method (``objective.embed``)."""
        if self._random_objective is None:
            state = torch.random.get_rng_state()
            torch.manual_seed(self.seed + 1)
            obj = type(self.objective)(self.objective.config, self.random_encoder())
            torch.random.set_rng_state(state)
            self._random_objective = obj.eval()
        return self._random_objective


@dataclass
class TaskResult:
    metrics: dict[str, Any]
    sections: list[Section]


TaskFn = Callable[[EvalContext], TaskResult]


@dataclass
class Task:
    name: str
    fn: TaskFn
    applies: Callable[[EvalContext], bool]
    default: bool = True  # run when no tasks are named (False: costly tasks, asked for by name)
    strict: bool = False  # True: never runs where ``applies`` is False, even when named


def _load_builtins() -> None:
    import anatomap.eval  # noqa: F401  (registers the built-in tasks)


TASKS: Registry[Task] = Registry("evaluation task", builtins=_load_builtins)


def register_task(
    name: str,
    applies: Callable[[EvalContext], bool] | None = None,
    default: bool = True,
    strict: bool = False,
) -> Callable[[TaskFn], TaskFn]:
    """Register a task (a name registered twice is an error). ``applies`` picks the
    checkpoints it runs on by default; a task named explicitly runs anyway unless ``strict``.
    ``default=False`` keeps a costly task out of the default selection."""

    def wrap(fn: TaskFn) -> TaskFn:
        TASKS.add(name, Task(name, fn, applies or (lambda ctx: True), default, strict))
        return fn

    return wrap


def list_tasks(default_only: bool = False, filter: str | None = None) -> list[str]:
    """Registered task names in registration order (``default_only``: those run when no
    tasks are named; ``filter``: fnmatch pattern such as ``"land*"``)."""
    return [n for n, t in TASKS.items(filter) if t.default or not default_only]


def get_task(name: str) -> Task:
    """The task registered as ``name`` (unknown: :class:`ConfigError` listing them)."""
    return TASKS.get(name)


def random_encoder(spec: EncoderSpec, seed: int = 0) -> Encoder:
    """The same architecture, freshly initialised with ``seed`` (the no-pretraining baseline)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    enc = build_encoder(spec)
    torch.random.set_rng_state(state)
    return enc.eval()
