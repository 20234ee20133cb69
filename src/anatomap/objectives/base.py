"""The objective interface every method implements.

An objective declares the views it wants (:meth:`view_spec`) and turns a batch of located
views into a loss (:meth:`forward`). It never reads files and does no coordinate arithmetic
of its own: targets come from :mod:`anatomap.geometry` applied to the batch's affines.
Parameters that an objective trains besides the encoder (heads, projectors) live in it, so
they are checkpointed with it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import Dataset

from anatomap.data.sampler import ViewSpec
from anatomap.models.encoders import Encoder


class ObjectiveParams(BaseModel):
    """Base of every method's config: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class Objective(nn.Module):
    """Base class: subclasses set ``Config`` and implement ``view_spec`` and ``forward``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[ObjectiveParams]] = ObjectiveParams

    def __init__(self, config: ObjectiveParams, encoder: Encoder) -> None:
        super().__init__()
        self.config = config
        self.spatial_dims = encoder.spatial_dims

    def view_spec(self) -> ViewSpec:
        raise NotImplementedError

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return ``{"loss": scalar, other scalars to log...}``."""
        raise NotImplementedError

    @classmethod
    def train_dataset(
        cls,
        config: ObjectiveParams,
        cache: Any,
        subjects: list[str],
        spec: ViewSpec,
        samples_per_epoch: int,
        seed: int,
    ) -> Dataset | None:
        """The method's own training dataset (e.g. Alice's mined view pairs), built before
        training from its validated ``config``; default ``None``: ``LocatedViewDataset``
        with :meth:`view_spec`."""
        return None

    def on_after_step(self, encoder: Encoder, step: int, max_steps: int) -> None:
        """Called after every optimiser step (e.g. to update an EMA teacher); default: nothing."""

    def embed(self, encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
        """The method's crop embedding used by the evaluation (default: encoder's pooled)."""
        return encoder(images).pooled


def flatten_views(images: torch.Tensor) -> torch.Tensor:
    """``[B, V, C, *S] -> [B*V, C, *S]``."""
    return images.reshape(-1, *images.shape[2:])
