"""The objective interface every method implements.

An objective declares the views it wants (:meth:`view_spec`) and turns a batch of located
views into a loss (:meth:`forward`). It never reads files and does no coordinate arithmetic
of its own: targets come from :mod:`anatomap.geometry` applied to the batch's affines.
Parameters that an objective trains besides the encoder (heads, projectors) live in it, so
they are checkpointed with it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import Dataset

from anatomap.data.sampler import IntensityAugment, ViewSpec
from anatomap.models.encoders import Encoder
from anatomap.models.heads import DenseHeads


class ObjectiveParams(BaseModel):
    """Base of every method's config: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class Objective(nn.Module):
    """Base class: subclasses set ``Config`` and implement ``view_spec`` and ``forward``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    dense_output: ClassVar[bool] = False
    """True for :class:`DenseObjective`: per-voxel maps usable by embed, match and landmarks."""

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
        pairs: Any = None,
    ) -> Dataset | None:
        """The method's own training dataset, built before training from its validated
        ``config`` (and, for Alice, the ``pairs`` that :mod:`anatomap.infer.mining` mined);
        default ``None``: ``LocatedViewDataset`` with :meth:`view_spec`."""
        return None

    @classmethod
    def mining_request(cls, config: ObjectiveParams) -> Any:
        """A :class:`~anatomap.data.pairs.MiningRequest` for pairs to mine before training
        (Alice), handed back to :meth:`train_dataset` as ``pairs``; default ``None``."""
        return None

    def on_after_step(self, encoder: Encoder, step: int, max_steps: int) -> None:
        """Called after every optimiser step (e.g. to update an EMA teacher); default: nothing."""

    def embed(self, encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
        """The method's crop embedding used by the evaluation (default: encoder's pooled)."""
        return encoder(images).pooled


def flatten_views(images: torch.Tensor) -> torch.Tensor:
    """``[B, V, C, *S] -> [B*V, C, *S]``."""
    return images.reshape(-1, *images.shape[2:])


class DenseObjective(Objective):
    """An objective with per-voxel output: unit-length coarse and fine maps from
    :class:`~anatomap.models.heads.DenseHeads` over the encoder pyramid (SAM, Yan et al., TMI
    2022). ``embed``, ``match`` and the ``landmarks`` task use :meth:`dense` and
    ``strides = (coarse stride, fine stride)``. Its config needs ``crop_size``, ``scale``,
    ``min_overlap``, ``augment``, ``embed_dim``, ``fpn_channels``, ``fine_level`` and
    ``coarse_level``. Training views: two overlapping crops of one volume."""

    dense_output: ClassVar[bool] = True

    def __init__(self, config: Any, encoder: Encoder) -> None:
        super().__init__(config, encoder)
        c = config
        self.heads = DenseHeads(encoder, c.embed_dim, c.fpn_channels, c.fine_level, c.coarse_level)
        self.strides: tuple[int, int] = (
            encoder.pyramid_strides[c.coarse_level],
            encoder.pyramid_strides[c.fine_level],
        )

    def view_spec(self) -> ViewSpec:
        c: Any = self.config
        return ViewSpec(
            num_views=2,
            size=(c.crop_size,) * self.spatial_dims,
            scale=c.scale,
            foreground=True,
            min_overlap=c.min_overlap,
            max_tries=100,
            intensity=IntensityAugment() if c.augment else None,
        )

    def dense(self, encoder: Encoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse and fine embedding maps ``[B, D, *s]`` (unit length along D)."""
        return self.heads(encoder.pyramid(images))

    def embed(self, encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
        """Crop embedding for the position readout: the mean coarse embedding of the crop."""
        coarse, _ = self.dense(encoder, images)
        return F.normalize(coarse.flatten(2).mean(-1), dim=-1)


def batch_generator(batch: dict[str, Any]) -> torch.Generator:
    """A CPU generator seeded from the batch's per-sample seeds (``batch["seed"]``, set by the
    sampler from each sample's ``(seed, epoch, index)``), so an objective's own random
    choices replay with its samples. A batch without seeds (hand-made) gets seed 0."""
    seeds = batch.get("seed")
    if seeds is None:
        values: list[int] = [0]
    elif isinstance(seeds, torch.Tensor):
        values = [int(v) for v in seeds.reshape(-1).tolist()]
    else:
        values = [int(v) for v in seeds]
    state = np.random.SeedSequence([v % 2**63 for v in values]).generate_state(1)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))
