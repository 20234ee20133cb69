"""Spatial-Aware self-supervision with multi-granularity observable tasks.

Zhang et al., "Spatial-Aware Self-Supervision for Medical 3D Imaging with Multi-Granularity
Observable Tasks", arXiv 2509.05967 (2025). Three sub-tasks whose progress can be watched:

- **gap matrix** (pair granularity): for every ordered pair of views ``(i, j)`` of a volume a
  head predicts the per-axis gap ``centre_j - centre_i`` (world mm / ``gap_scale``) from the
  difference of the two dense feature maps (1x1 conv + GELU + average pooling + linear).
  Loss: MSE on the per-axis gaps + ``norm_weight`` x MSE on the gap norms
  (:func:`gap_matrix_loss`).
- **adjacent / distant discrimination** (sub-region granularity): in views ``i`` and ``j``,
  sub-regions shifted towards each other along the gap vector ("adjacent") should have
  agreeing features, sub-regions shifted away from each other ("distant") should not. Loss:
  ``-cos(adjacent) + cos(distant)`` (:func:`adjacency_loss`; minimum -2, zero for features
  that do not tell the two apart).
- **absolute location with route-based connectivity** (volume granularity): a head predicts a
  3-D location per view; the pairwise differences of the predicted locations fit the gaps
  (SmoothL1, :func:`location_loss`). Along routes through all views (Hamiltonian paths from
  view 0) the cumulative sums of the *predicted gaps* must match the true cumulative gaps
  (SmoothL1, :func:`route_loss`). Sums of predicted *location* differences telescope to the
  end-point difference, so the route term acts on the gap head: it makes the pairwise
  predictions composable (``g_ab + g_bc = g_ac``), which ties the pair granularity to the
  volume granularity. Routes: all ``(N-1)!`` for ``N <= route_enumerate_max`` (default 5, at
  most 24 routes), otherwise ``num_routes`` random orderings of views ``1..N-1`` after view 0,
  drawn afresh at each step; the cost is ``O(R * N)`` per volume (one gather + one cumsum).

The "other" view of each pair goes through an EMA (momentum) copy of the encoder that gets no
gradients; it lives in this module (so it is checkpointed with the objective) and is updated
after each optimiser step with a momentum that rises from ``ema_momentum`` to
``ema_momentum_end`` on a cosine schedule (as BYOL does).

Every target is computed by :mod:`anatomap.geometry` from the views' affines: view centres
(``box_center``), gaps (``pairwise_gaps``), sub-region positions (``world_to_voxel``,
``voxel_to_grid``). The loss maths are tensor-in / tensor-out functions, tested on their own.
"""

from __future__ import annotations

import copy
import itertools
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from anatomap import geometry
from anatomap.data.sampler import ViewSpec
from anatomap.errors import ConfigError
from anatomap.models.ema import ema_momentum, ema_update
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import Objective, ObjectiveParams, flatten_views
from anatomap.objectives.registry import register_objective

# --------------------------------------------------------------------------------------------
# Pure loss functions (tensor in, tensor out)
# --------------------------------------------------------------------------------------------


def off_diagonal(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[n, n]`` mask of the ordered pairs ``i != j``."""
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _safe_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Euclidean norm over the last axis with a finite gradient at zero."""
    return (x.pow(2).sum(-1) + eps).sqrt()


def gap_matrix_loss(
    pred: torch.Tensor, target: torch.Tensor, norm_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gap-matrix loss (Zhang et al. 2025): MSE on per-axis gaps + MSE on gap norms.

    ``pred`` and ``target`` are ``[B, N, N, 3]`` (entry ``(i, j)``: gap from view i to view j,
    in units of ``gap_scale`` mm); the diagonal is left out.
    """
    mask = off_diagonal(pred.shape[1], pred.device)
    p, t = pred[:, mask], target[:, mask]  # [B, N(N-1), 3]
    axes = (p - t).pow(2).mean()
    norms = (_safe_norm(p) - _safe_norm(t)).pow(2).mean()
    loss = axes + norm_weight * norms
    return loss, {"gap_mse": axes.detach(), "gap_norm_mse": norms.detach()}


def adjacency_loss(
    adjacent: torch.Tensor,
    distant: torch.Tensor,
    adjacent_other: torch.Tensor,
    distant_other: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adjacent / distant discrimination: ``-cos(adjacent pair) + cos(distant pair)``.

    Inputs are sub-region features ``[B, N, N, F]``: entry ``(i, j)`` of ``adjacent`` is view
    i's sub-region shifted *towards* view j, of ``distant`` the one shifted *away* from it
    (online encoder); ``*_other`` are the same for the EMA encoder. The adjacent pair of
    ``(i, j)`` is ``adjacent[i, j]`` with ``adjacent_other[j, i]`` (the two sub-regions facing
    each other), the distant pair ``distant[i, j]`` with ``distant_other[j, i]``. Averaged
    over ordered pairs ``i != j``; ranges over [-2, 2].
    """
    mask = off_diagonal(adjacent.shape[1], adjacent.device)
    cos_adj = F.cosine_similarity(adjacent, adjacent_other.transpose(1, 2), dim=-1, eps=1e-6)
    cos_dist = F.cosine_similarity(distant, distant_other.transpose(1, 2), dim=-1, eps=1e-6)
    cos_adj, cos_dist = cos_adj[:, mask].mean(), cos_dist[:, mask].mean()
    return -cos_adj + cos_dist, {
        "cos_adjacent": cos_adj.detach(),
        "cos_distant": cos_dist.detach(),
    }


def location_loss(
    locations: torch.Tensor, target_gaps: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """SmoothL1 between the pairwise differences of predicted locations and the true gaps.

    ``locations [B, N, 3]``, ``target_gaps [B, N, N, 3]`` (same units); off-diagonal pairs.
    Invariant to a translation of all predicted locations of a volume.
    """
    pred = geometry.pairwise_gaps(locations)
    mask = off_diagonal(locations.shape[1], locations.device)
    return F.smooth_l1_loss(pred[:, mask], target_gaps[:, mask], beta=beta)


def enumerate_routes(n: int, device: torch.device | None = None) -> torch.Tensor:
    """All Hamiltonian paths through ``n`` views starting at view 0: ``[(n-1)!, n]`` long."""
    rest = list(itertools.permutations(range(1, n)))
    routes = torch.tensor([(0, *r) for r in rest], dtype=torch.long, device=device)
    return routes.reshape(len(rest), n)


def sample_routes(
    n: int,
    num_routes: int,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``num_routes`` random Hamiltonian paths from view 0 (uniform orderings of 1..n-1)."""
    keys = torch.rand(num_routes, n - 1, generator=generator, device=device)
    rest = keys.argsort(dim=-1) + 1
    start = torch.zeros(num_routes, 1, dtype=torch.long, device=device)
    return torch.cat([start, rest], dim=1)


def route_set(
    n: int,
    enumerate_max: int = 5,
    num_routes: int = 24,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The routes used for ``n`` views: every path from view 0 when ``n <= enumerate_max``
    ((n-1)! routes), else ``num_routes`` sampled ones. ``[R, n]`` long."""
    if n <= enumerate_max:
        return enumerate_routes(n, device)
    return sample_routes(n, num_routes, device, generator)


def route_sums(gaps: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """Cumulative gap sums along each route: ``[B, R, N-1, 3]``.

    ``gaps [B, N, N, 3]`` (entry ``(a, b)``: gap from view a to view b), ``routes [R, N]``.
    Entry ``k`` of route ``r`` is ``sum_{m<=k} gaps[r_m, r_{m+1}]``: for true gaps this is the
    position of view ``r_{k+1}`` relative to the route's start. One gather and one cumsum:
    ``O(R * N)``.
    """
    src, dst = routes[:, :-1], routes[:, 1:]  # [R, N-1]
    steps = gaps[:, src, dst]  # [B, R, N-1, 3]
    return steps.cumsum(dim=2)


def route_loss(
    pred_gaps: torch.Tensor,
    target_gaps: torch.Tensor,
    routes: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """SmoothL1 between predicted and true cumulative gaps along ``routes`` (Zhang et al.)."""
    return F.smooth_l1_loss(
        route_sums(pred_gaps, routes), route_sums(target_gaps, routes), beta=beta
    )


# --------------------------------------------------------------------------------------------
# Geometry of the sub-regions (all through anatomap.geometry)
# --------------------------------------------------------------------------------------------


def region_grid(
    affines: torch.Tensor,
    shape: tuple[int, ...],
    shift: float = 0.25,
    size: float = 0.5,
) -> torch.Tensor:
    """Sampling grid of the adjacent / distant sub-regions of every view towards every other.

    ``affines [B, N, 4, 4]`` (voxel -> world mm) of views of ``shape`` voxels. For view i and
    partner j, with ``u`` the unit gap vector from i's centre to j's, the adjacent sub-region
    of i is centred at ``c_i + d_i u`` and the distant one at ``c_i - d_i u``, where
    ``d_i = shift * (smallest physical edge of view i)`` mm; each sub-region is the
    axis-aligned (in view voxels) box of ``size`` times the view's edge around that centre,
    represented by the centres of its 2^d octants. Returns grid_sample coordinates
    ``[B, N, 2, N, 2^d, d]`` (axis 2: adjacent, distant; axis 3: partner j).
    """
    d = len(shape)
    aff = affines.to(torch.float64)
    centres = geometry.box_center(aff, shape)  # [B, N, 3]
    gaps = geometry.pairwise_gaps(centres)  # [B, N, N, 3]: (i, j) = c_j - c_i
    unit = gaps / gaps.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    extent = geometry.spacing(aff)[..., :d] * torch.as_tensor(shape, dtype=aff.dtype)
    reach = shift * extent.min(dim=-1).values  # [B, N] mm
    offset = reach[..., None, None] * unit  # [B, N, N, 3]
    points = torch.stack([centres[:, :, None] + offset, centres[:, :, None] - offset], 2)
    b, n = points.shape[:2]
    vox = geometry.world_to_voxel(aff, points.reshape(b, n, 2 * n, 3))  # [B, N, 2N, 3]
    # Octant centres of the sub-box, in voxels of the view (zero third index for 2-D views).
    half = torch.as_tensor(shape, dtype=aff.dtype) * size / 4.0
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=d)), dtype=aff.dtype)
    octants = torch.zeros(len(signs), 3, dtype=aff.dtype)
    octants[:, :d] = signs * half
    vox = vox[..., None, :] + octants.to(vox.device)  # [B, N, 2N, K, 3]
    grid = geometry.voxel_to_grid(vox, shape)  # [B, N, 2N, K, d]
    return grid.reshape(b, n, 2, n, len(signs), d).to(affines.dtype)


def region_features(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Average features of each sub-region: ``features [B*N, F, *s]`` sampled (bi/trilinear,
    border padding) at ``grid [B, N, 2, N, K, d]`` -> ``(adjacent, distant)``, each
    ``[B, N, N, F]``."""
    b, n, _, _, k, d = grid.shape
    g = grid.reshape(b * n, 2 * n, k, *([1] * (d - 2)), d).to(features.dtype)
    out = F.grid_sample(features, g, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.reshape(b, n, features.shape[1], 2, n, k).mean(-1)  # [B, N, F, 2, N]
    out = out.permute(0, 3, 1, 4, 2)  # [B, 2, N, N, F]
    return out[:, 0], out[:, 1]


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


class GapHead(nn.Module):
    """Per-axis gap from a pair of dense maps: 1x1 conv + GELU + average pool + linear on the
    feature difference ``b_j - a_i``.

    A 1x1 convolution is linear, so ``conv(b_j - a_i) = W b_j - W a_i + bias``: the
    convolution runs once per view (``O(N)``) and only the cheap difference, activation and
    pooling run per pair (``O(N^2)``).
    """

    def __init__(self, channels: int, hidden: int, spatial_dims: int) -> None:
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.conv = conv(channels, hidden, kernel_size=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(hidden, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor, num_views: int) -> torch.Tensor:
        """``a``, ``b``: ``[B*N, F, *s]`` (views of B volumes) -> gaps ``[B, N, N, 3]``."""
        wa = self.conv(a).flatten(2)  # [B*N, H, S]
        wb = self.conv(b).flatten(2)
        wa = wa.reshape(-1, num_views, *wa.shape[1:])
        wb = wb.reshape(-1, num_views, *wb.shape[1:])
        diff = wb[:, None] - wa[:, :, None] + self.bias[:, None]  # [B, N, N, H, S]
        return self.out(F.gelu(diff).mean(-1))


class LocationHead(nn.Module):
    """Absolute 3-D location (units of ``gap_scale`` mm) from the pooled embedding: MLP."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 3))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


class SpatialAwareConfig(ObjectiveParams):
    num_views: int = Field(default=8, ge=2, description="views per volume (N)")
    crop_size: int = Field(default=32, gt=0, description="view edge in voxels")
    foreground: bool = Field(default=True, description="view centres on foreground voxels")
    gap_scale: float = Field(default=10.0, gt=0, description="mm per unit of gap / location")
    gap_weight: float = Field(default=1.0, ge=0, description="gap-matrix loss (0: off)")
    norm_weight: float = Field(default=1.0, ge=0, description="gap-norm MSE inside the gap loss")
    adjacency_weight: float = Field(default=0.5, ge=0, description="adjacent/distant (0: off)")
    location_weight: float = Field(default=1.0, ge=0, description="absolute location (0: off)")
    route_weight: float = Field(default=0.5, ge=0, description="route connectivity (0: off)")
    smooth_l1_beta: float = Field(default=1.0, gt=0, description="SmoothL1 beta (gap units)")
    region_shift: float = Field(default=0.25, ge=0, le=0.5, description="sub-region shift / edge")
    region_size: float = Field(default=0.5, gt=0, le=1, description="sub-region edge / view edge")
    region_level: int = Field(default=-1, description="pyramid level of sub-region features")
    route_enumerate_max: int = Field(default=5, ge=2, le=8, description="enumerate if N <= this")
    num_routes: int = Field(default=24, ge=1, description="sampled routes R when N is larger")
    head_hidden: int = Field(default=128, gt=0, description="hidden width of both heads")
    ema_momentum: float = Field(default=0.99, ge=0, le=1, description="EMA momentum at step 0")
    ema_momentum_end: float = Field(default=1.0, ge=0, le=1, description="... at the last step")
    embedding: Literal["pooled", "location"] = Field(
        default="pooled", description="crop embedding for evaluation (embed())"
    )

    @model_validator(mode="after")
    def _something_on(self) -> SpatialAwareConfig:
        w = (self.gap_weight, self.adjacency_weight, self.location_weight, self.route_weight)
        if not any(x > 0 for x in w):
            raise ValueError("every sub-task weight is 0: switch at least one on")
        return self


@register_objective("spatial_aware")
class SpatialAware(Objective):
    """Gap matrix + adjacent/distant discrimination + absolute location with routes
    (Zhang et al., arXiv 2509.05967), with an EMA encoder for the other view of each pair."""

    Config = SpatialAwareConfig
    config: SpatialAwareConfig

    def __init__(self, config: SpatialAwareConfig, encoder: Encoder) -> None:
        super().__init__(config, encoder)
        c = config
        levels = len(encoder.pyramid_channels)
        if not -levels <= c.region_level < levels:
            raise ConfigError(
                f"objective.region_level={c.region_level}: the encoder has {levels} pyramid "
                f"levels (use -{levels}..{levels - 1})"
            )
        self.gap_head = GapHead(encoder.feature_channels, c.head_hidden, encoder.spatial_dims)
        self.location_head = LocationHead(encoder.embed_dim, c.head_hidden)
        self.ema = copy.deepcopy(encoder)
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def view_spec(self) -> ViewSpec:
        c = self.config
        return ViewSpec(
            num_views=c.num_views,
            size=(c.crop_size,) * self.spatial_dims,
            foreground=c.foreground,
        )

    def _uses_ema(self) -> bool:
        c = self.config
        return c.gap_weight > 0 or c.route_weight > 0 or c.adjacency_weight > 0

    def predict(self, encoder: Encoder, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Observables of views ``images [B, N, C, *S]``: predicted gaps ``[B, N, N, 3]`` (from
        online view i and EMA view j) and absolute locations ``[B, N, 3]``, both in mm."""
        b, n = images.shape[:2]
        x = flatten_views(images)
        feats = encoder(x)
        with torch.no_grad():
            other = self.ema(x).features
        s = self.config.gap_scale
        gaps = self.gap_head(feats.features, other, n).float() * s
        loc = self.location_head(feats.pooled).float().reshape(b, n, 3) * s
        return {"gaps_mm": gaps, "locations_mm": loc}

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config
        images = batch["image"]
        b, n = images.shape[:2]
        shape = tuple(images.shape[3:])
        x = flatten_views(images)
        levels = encoder.pyramid(x)
        feats = levels[-1]
        pooled = encoder.pool(feats)
        level = c.region_level

        centres = geometry.box_center(batch["affine"], shape).float()  # [B, N, 3] mm
        gaps_mm = geometry.pairwise_gaps(centres)  # [B, N, N, 3]
        target = gaps_mm / c.gap_scale

        loss = torch.zeros((), device=images.device)
        logs: dict[str, torch.Tensor] = {}
        if self._uses_ema():
            with torch.no_grad():
                other_levels = self.ema.pyramid(x)
            other = other_levels[-1]
        if c.gap_weight > 0 or c.route_weight > 0:
            pred = self.gap_head(feats, other, n).float()  # [B, N, N, 3]
            mask = off_diagonal(n, pred.device)
            err = (pred.detach() - target)[:, mask].norm(dim=-1).mean() * c.gap_scale
            logs["gap_error_mm"] = err.detach()
            if c.gap_weight > 0:
                gap, parts = gap_matrix_loss(pred, target, c.norm_weight)
                loss = loss + c.gap_weight * gap
                logs.update(parts)
            if c.route_weight > 0:
                routes = route_set(n, c.route_enumerate_max, c.num_routes, device=pred.device)
                route = route_loss(pred, target, routes, c.smooth_l1_beta)
                loss = loss + c.route_weight * route
                logs["route"] = route.detach()
        if c.adjacency_weight > 0:
            grid = region_grid(batch["affine"], shape, c.region_shift, c.region_size)
            adj, dist = region_features(levels[level], grid)
            adj_o, dist_o = region_features(other_levels[level], grid)
            adjacency, parts = adjacency_loss(
                adj.float(), dist.float(), adj_o.float(), dist_o.float()
            )
            loss = loss + c.adjacency_weight * adjacency
            logs.update({"adjacency": adjacency.detach(), **parts})
        if c.location_weight > 0:
            loc = self.location_head(pooled).float().reshape(b, n, 3)
            location = location_loss(loc, target, c.smooth_l1_beta)
            loss = loss + c.location_weight * location
            mask = off_diagonal(n, loc.device)
            err = (geometry.pairwise_gaps(loc.detach()) - target)[:, mask].norm(dim=-1).mean()
            logs.update({"location": location.detach(), "location_error_mm": err * c.gap_scale})
        return {"loss": loss, **logs}

    def on_after_step(self, encoder: Encoder, step: int, max_steps: int) -> None:
        m = ema_momentum(step, max_steps, self.config.ema_momentum, self.config.ema_momentum_end)
        ema_update(self.ema, encoder, m)

    def embed(self, encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
        """``embedding: pooled`` (default): the encoder's pooled vector; ``location``: the
        predicted absolute location (mm)."""
        pooled = encoder(images).pooled
        if self.config.embedding == "location":
            return self.location_head(pooled) * self.config.gap_scale
        return pooled
