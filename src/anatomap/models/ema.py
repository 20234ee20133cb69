"""Exponential moving averages of a network (BYOL, Grill et al. 2020; DINO, Caron et al. 2021).

Used by Spatial-Aware's EMA encoder and Alice's teacher.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def ema_momentum(step: int, max_steps: int, start: float = 0.99, end: float = 1.0) -> float:
    """Cosine schedule from ``start`` (step 0) to ``end`` (step ``max_steps``), as in BYOL."""
    frac = min(max(step / max(1, max_steps), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * frac) + 1.0) / 2.0


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """``ema <- momentum * ema + (1 - momentum) * online`` for parameters; buffers copied."""
    for e, o in zip(ema.parameters(), online.parameters(), strict=True):
        e.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
    for e, o in zip(ema.buffers(), online.buffers(), strict=True):
        e.copy_(o)
