"""Fixtures of the reliability suite: tiny training configs on the session's tiny cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


def train_overrides(cache: Path, out: Path, steps: int, **extra: object) -> list[str]:
    """A CPU-sized ISImed run: 8^3 crops, a two-level small_cnn, a checkpoint every step."""
    base: dict[str, object] = {
        "data.cache": cache,
        "output": out,
        "data.num_workers": 0,
        "data.samples_per_epoch": 6,
        "objective.name": "isimed",
        "objective.crop_size": 8,
        "objective.num_crops": 4,
        "model.options": "{channels: [8, 16]}",
        "trainer.max_steps": steps,
        "trainer.batch_size": 2,
        "trainer.checkpoint_every": 1,
        "trainer.log_every": 1,
        "trainer.lr_decay": 0.5,
        "trainer.progress": "false",
        "trainer.seed": 3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items() if v is not None]  # None: leave the key out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Bit-identical CPU results need the same thread count in every run compared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def overrides(tiny_cache: Path) -> Callable[..., list[str]]:
    def make(out: Path, steps: int, **extra: object) -> list[str]:
        return train_overrides(tiny_cache, out, steps, **extra)

    return make
