"""Evaluation tasks: a registry, and the context every task receives.

A task is a function ``(ctx) -> TaskResult`` registered with :func:`register_task`; it
returns metrics (JSON-able) and report sections. ``applies`` decides whether a task runs for
a given checkpoint (e.g. landmark matching needs dense embeddings; the gap-matrix view needs a
spatial_aware checkpoint). Tasks always compare against the same-architecture random encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anatomap.checkpoint import LoadedCheckpoint
from anatomap.data.cache import Cache
from anatomap.eval.report import Section
from anatomap.models.encoders import Encoder, EncoderSpec, build_encoder
from anatomap.objectives.base import Objective
from anatomap.registry import Registry


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
