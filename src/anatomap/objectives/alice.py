"""Alice: anatomical invariance modelling and semantic alignment (Jiang et al., ICCV 2023,
arXiv 2302.05615; the project's METHODS.md section 3).

Two views showing the same anatomy in *different* volumes: a SAM checkpoint matches a
foreground point of volume A into volume B (mined ahead of training and cached,
:mod:`anatomap.infer.mining`), and a crop is cut around each point. A student encoder sees
both views with ``mask_ratio`` of their patches masked; an EMA teacher (a copy of the
encoder and heads, no gradients, updated after each step) sees them intact. Three losses,
each switched off by a zero weight:

- **global** (DINO-style): cross-entropy between the teacher's centred, sharpened
  distribution of one view and the student's distribution of the other (student temperature
  0.1; teacher temperature warmed up linearly; centre momentum 0.9). The global output is
  the encoder's pooled vector through a projection head with a cosine prototype layer.
- **MIM**: the masked patches are reconstructed from the student's token map (a 1x1 head
  to ``patch^3`` voxels per token, as SimMIM) with MSE on the masked patches (weight 10).
- **CAFA** (conditional anatomical feature alignment): the student's masked-patch tokens of
  one view attend (MONAI ``CrossAttentionBlock``, 8 heads) to the teacher's tokens of the
  other view, then a patch-level cross-entropy (iBOT-style, with its own centre) against
  the teacher's tokens of the same, unmasked view at those positions.

The patch tokens are the encoder pyramid level of stride ``patch_size``; the default
encoder is the Swin transformer of MONAI's SwinUNETR (``configs/alice.yaml``).

Our choices (docs/methods/alice.md): masking is done in image space (masked patches take a
learnable per-channel value, like Swin UNETR's masked-volume inpainting), so Alice runs on
every registered encoder; the views get scale jitter and intensity augmentation but no
rotation; the weight-decay schedule (0.04 -> 0.4) is replaced by the trainer's constant
weight decay.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.networks.blocks import CrossAttentionBlock, MLPBlock
from pydantic import Field, model_validator
from torch import nn

from anatomap.data.pairs import MinedPairDataset, MinedPairs, MiningRequest
from anatomap.data.sampler import IntensityAugment, ViewSpec
from anatomap.errors import ConfigError
from anatomap.models.ema import ema_momentum, ema_update
from anatomap.models.encoders import Encoder
from anatomap.models.heads import ProjectionHead
from anatomap.objectives.alice_losses import (
    apply_mask,
    distillation_ce,
    masked_mse,
    patchify,
    random_patch_mask,
    teacher_temperature,
    updated_center,
)
from anatomap.objectives.base import Objective, ObjectiveParams, batch_generator, flatten_views
from anatomap.objectives.registry import register_objective


class AliceConfig(ObjectiveParams):
    crop_size: int = Field(default=32, gt=0, description="view edge in voxels")
    scale: tuple[float, float] = Field(default=(0.9, 1.1), description="per-view scale jitter")
    augment: bool = Field(default=True, description="per-view gamma / scale / noise")
    # views
    cross_volume: bool = Field(default=True, description="mined cross-volume pairs (else same)")
    sam_checkpoint: str | None = Field(default=None, description="SAM run/checkpoint for mining")
    mining_dir: str | None = Field(default=None, description="default: <SAM run>/mined/<key>")
    mine_pairs_per_subject: int = Field(default=32, gt=0)
    mine_threshold: float = Field(default=0.7, ge=-1, le=1, description="match score to keep")
    mine_tries: int = Field(default=100, gt=0, description="points tried per pair")
    mine_window: int = Field(default=64, gt=0, description="SAM sliding-window edge")
    # tokens and masking
    patch_size: int = Field(default=8, gt=0, description="stride of the token level")
    mask_ratio: float = Field(default=0.75, ge=0, lt=1)
    # losses (0 switches a piece off)
    global_weight: float = Field(default=1.0, ge=0)
    mim_weight: float = Field(default=10.0, ge=0)
    cafa_weight: float = Field(default=1.0, ge=0)
    # heads
    out_dim: int = Field(default=1024, gt=0, description="prototypes (reference 65536)")
    head_hidden: int = Field(default=256, gt=0)
    head_bottleneck: int = Field(default=64, gt=0)
    cafa_dim: int = Field(default=64, gt=0)
    cafa_heads: int = Field(default=8, gt=0)
    # distillation
    student_temperature: float = Field(default=0.1, gt=0)
    teacher_temperature: float = Field(default=0.008, gt=0, description="at step 0")
    teacher_temperature_end: float = Field(default=0.01, gt=0, description="after warm-up")
    teacher_warmup_steps: int = Field(default=100, ge=0)
    center_momentum: float = Field(default=0.9, ge=0, le=1)
    ema_momentum: float = Field(default=0.996, ge=0, le=1, description="EMA momentum at step 0")
    ema_momentum_end: float = Field(default=1.0, ge=0, le=1, description="... at the last step")

    @model_validator(mode="after")
    def _check(self) -> AliceConfig:
        if not any(w > 0 for w in (self.global_weight, self.mim_weight, self.cafa_weight)):
            raise ValueError("global_weight, mim_weight and cafa_weight are all 0: switch one on")
        if self.crop_size % self.patch_size:
            raise ValueError(f"crop_size {self.crop_size} is not a multiple of {self.patch_size}")
        if self.cafa_dim % self.cafa_heads:
            raise ValueError(f"cafa_dim {self.cafa_dim} is not divisible by {self.cafa_heads}")
        return self


class CAFA(nn.Module):
    """Conditional anatomical feature alignment: masked-patch tokens ``[B, M, F]`` attend to
    the other view's tokens ``[B, N, F]`` (MONAI ``CrossAttentionBlock``), with pre-norms, a
    residual connection and an MLP (a transformer decoder layer without self-attention)."""

    def __init__(self, channels: int, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(channels)
        self.norm_c = nn.LayerNorm(channels)
        self.attn = CrossAttentionBlock(
            hidden_size=dim,
            num_heads=heads,
            hidden_input_size=channels,
            context_input_size=channels,
            qkv_bias=True,
        )
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = MLPBlock(channels, 2 * channels, 0.0, act="GELU")

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = queries + self.attn(self.norm_q(queries), context=self.norm_c(context))
        return x + self.mlp(self.norm_mlp(x))


def token_level(encoder: Encoder, patch_size: int) -> int:
    """The pyramid level whose stride is ``patch_size`` (a ConfigError if none)."""
    strides = encoder.pyramid_strides
    if patch_size not in strides:
        raise ConfigError(
            f"objective.patch_size={patch_size}: encoder '{encoder.spec.name}' has pyramid "
            f"strides {strides}; choose one of them"
        )
    return strides.index(patch_size)


@register_objective("alice")
class Alice(Objective):
    """Cross-volume self-distillation + masked image modelling + CAFA (Jiang et al. 2023)."""

    Config = AliceConfig
    config: AliceConfig

    def __init__(self, config: AliceConfig, encoder: Encoder) -> None:
        super().__init__(config, encoder)
        c = config
        self.level = token_level(encoder, c.patch_size)
        channels = encoder.pyramid_channels[self.level]
        d = encoder.spatial_dims
        self.mask_value = nn.Parameter(torch.zeros(encoder.in_channels))
        conv = nn.Conv3d if d == 3 else nn.Conv2d
        self.decoder = conv(channels, encoder.in_channels * c.patch_size**d, kernel_size=1)
        self.head = ProjectionHead(encoder.embed_dim, c.head_hidden, c.head_bottleneck, c.out_dim)
        self.patch_head = ProjectionHead(channels, c.head_hidden, c.head_bottleneck, c.out_dim)
        self.cafa = CAFA(channels, c.cafa_dim, c.cafa_heads)
        # The EMA teacher: encoder and both heads; never trained by the optimiser.
        self.teacher = copy.deepcopy(encoder)
        self.teacher_head = copy.deepcopy(self.head)
        self.teacher_patch_head = copy.deepcopy(self.patch_head)
        for module in self.teacher_modules():
            for p in module.parameters():
                p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(c.out_dim))
        self.register_buffer("patch_center", torch.zeros(c.out_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def teacher_modules(self) -> list[nn.Module]:
        return [self.teacher, self.teacher_head, self.teacher_patch_head]

    # -- data ----------------------------------------------------------------------------

    def view_spec(self) -> ViewSpec:
        c = self.config
        return ViewSpec(
            num_views=2,
            size=(c.crop_size,) * self.spatial_dims,
            scale=c.scale,
            foreground=True,
            min_overlap=0.5,
            intensity=IntensityAugment() if c.augment else None,
        )

    @classmethod
    def mining_request(cls, config: ObjectiveParams) -> MiningRequest | None:
        """The cross-volume pairs to mine with the SAM checkpoint before training; ``None``
        without one (allowed for same-volume views only)."""
        c: AliceConfig = config  # type: ignore[assignment]
        if c.sam_checkpoint is None:
            if c.cross_volume:
                raise ConfigError(
                    "objective.sam_checkpoint is needed to mine cross-volume views (or set "
                    "objective.cross_volume=false)"
                )
            return None
        return MiningRequest(
            c.sam_checkpoint,
            c.mining_dir,
            pairs_per_subject=c.mine_pairs_per_subject,
            threshold=c.mine_threshold,
            max_tries=c.mine_tries,
            window=c.mine_window,
        )

    @classmethod
    def train_dataset(
        cls,
        config: ObjectiveParams,
        cache: Any,
        subjects: list[str],
        spec: ViewSpec,
        samples_per_epoch: int,
        seed: int,
        pairs: MinedPairs | None = None,
    ) -> Any:
        """Views around the mined cross-volume ``pairs`` (or same-volume views around the
        points of A, for the ablation; random foreground points without pairs)."""
        c: AliceConfig = config  # type: ignore[assignment]
        return MinedPairDataset(
            cache, subjects, spec, samples_per_epoch, seed, pairs, cross_volume=c.cross_volume
        )

    # -- training ------------------------------------------------------------------------

    def _teacher_temperature(self) -> float:
        c = self.config
        return teacher_temperature(
            int(self.step), c.teacher_warmup_steps, c.teacher_temperature, c.teacher_temperature_end
        )

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config
        images = batch["image"]
        b = images.shape[0]
        x = flatten_views(images)  # [2B, C, *S]: (volume 0 view 0, volume 0 view 1, ...)
        p = c.patch_size
        grid = tuple(s // p for s in x.shape[2:])
        masking = c.mim_weight > 0 or c.cafa_weight > 0
        gen = batch_generator(batch)
        mask = random_patch_mask(len(x), grid, c.mask_ratio if masking else 0.0, gen, x.device)
        x_in = apply_mask(x, mask, p, self.mask_value) if masking else x

        levels = encoder.pyramid(x_in)
        tokens = levels[self.level]  # [2B, F, *grid]
        with torch.no_grad():
            t_levels = self.teacher.pyramid(x)
            t_tokens = t_levels[self.level]
        tt = self._teacher_temperature()
        loss = torch.zeros((), device=x.device)
        logs: dict[str, torch.Tensor] = {"teacher_temperature": torch.tensor(tt)}

        if c.global_weight > 0:
            s_out = self.head(encoder.pool(levels[-1])).view(b, 2, -1)
            with torch.no_grad():
                t_out = self.teacher_head(self.teacher.pool(t_levels[-1])).view(b, 2, -1)
            # Student view v against the teacher's other view.
            glob = distillation_ce(s_out, t_out.flip(1), self.center, c.student_temperature, tt)
            loss = loss + c.global_weight * glob
            logs["global"] = glob.detach()
            if self.training:
                self.center.copy_(updated_center(self.center, t_out, c.center_momentum))

        if c.mim_weight > 0:
            pred = self.decoder(tokens)
            mim = masked_mse(pred, patchify(x, p), mask)
            loss = loss + c.mim_weight * mim
            logs["mim"] = mim.detach()

        if c.cafa_weight > 0:
            f = tokens.shape[1]
            s_tok = tokens.flatten(2).transpose(1, 2)  # [2B, N, F]
            t_tok = t_tokens.flatten(2).transpose(1, 2)
            flat = mask.flatten(1)  # [2B, N], the same count per row
            m = int(flat[0].sum())
            queries = s_tok[flat].view(len(x), m, f)
            # Context: the teacher's tokens of the *other* view of the same pair.
            other = t_tok.view(b, 2, -1, f).flip(1).reshape(len(x), -1, f)
            aligned = self.cafa(queries, other)
            s_patch = self.patch_head(aligned)
            with torch.no_grad():
                t_patch = self.teacher_patch_head(t_tok[flat].view(len(x), m, f))
            cafa = distillation_ce(s_patch, t_patch, self.patch_center, c.student_temperature, tt)
            loss = loss + c.cafa_weight * cafa
            logs["cafa"] = cafa.detach()
            if self.training:
                self.patch_center.copy_(
                    updated_center(self.patch_center, t_patch, c.center_momentum)
                )
        return {"loss": loss, **logs}

    def on_after_step(self, encoder: Encoder, step: int, max_steps: int) -> None:
        """EMA update of the teacher (cosine momentum 0.996 -> 1) and the step counter."""
        c = self.config
        mom = ema_momentum(step, max_steps, c.ema_momentum, c.ema_momentum_end)
        ema_update(self.teacher, encoder, mom)
        ema_update(self.teacher_head, self.head, mom)
        ema_update(self.teacher_patch_head, self.patch_head, mom)
        self.step.fill_(step)
