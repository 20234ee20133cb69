"""Encoders over MONAI networks with one interface: a dense feature map and a pooled vector.

Every encoder is registered by name (a decorator registry in the style of timm) and built
from an :class:`EncoderSpec`, which a checkpoint stores so the encoder can be rebuilt for
fine-tuning (as nnssl's adaptation plans do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn

from anatomap.errors import ConfigError


class EncoderOutput(NamedTuple):
    """``features``: dense map ``[B, F, *s]``; ``pooled``: embedding ``[B, D]``."""

    features: torch.Tensor
    pooled: torch.Tensor


@dataclass
class EncoderSpec:
    """Everything needed to rebuild an encoder: registry name and constructor arguments."""

    name: str = "small_cnn"
    spatial_dims: int = 3
    in_channels: int = 1
    embed_dim: int = 64
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        return cls(**d)


class Encoder(nn.Module):
    """A backbone producing a dense map, global average pooling and a linear projection.

    ``backbone(x)`` returns ``[B, feature_channels, *s]``; ``pooled`` is the projection of
    the spatial mean to ``embed_dim``.
    """

    def __init__(self, backbone: nn.Module, feature_channels: int, spec: EncoderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.feature_channels = feature_channels
        self.proj = nn.Linear(feature_channels, spec.embed_dim)

    @property
    def spatial_dims(self) -> int:
        return self.spec.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        feats = self.backbone(x)
        pooled = self.proj(feats.flatten(2).mean(-1))
        return EncoderOutput(feats, pooled)


EncoderFactory = Callable[[EncoderSpec], Encoder]
_ENCODERS: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: register a factory ``spec -> Encoder`` under ``name``."""

    def wrap(fn: EncoderFactory) -> EncoderFactory:
        if name in _ENCODERS:
            raise ValueError(f"encoder '{name}' registered twice")
        _ENCODERS[name] = fn
        return fn

    return wrap


def list_encoders() -> list[str]:
    return sorted(_ENCODERS)


def build_encoder(spec: EncoderSpec) -> Encoder:
    """Build a registered encoder; unknown names and bad options give a ConfigError."""
    if spec.name not in _ENCODERS:
        raise ConfigError(
            f"unknown encoder '{spec.name}'; registered: {', '.join(list_encoders())}"
        )
    try:
        return _ENCODERS[spec.name](spec)
    except TypeError as exc:
        raise ConfigError(f"encoder '{spec.name}': bad options {spec.options}: {exc}") from None


@register_encoder("small_cnn")
def small_cnn(spec: EncoderSpec) -> Encoder:
    """MONAI residual units with stride 2 (the down path of MONAI's ``UNet``); CPU friendly.

    Options: ``channels`` (default ``[16, 32, 64, 128]``), ``num_groups`` for GroupNorm (8).
    GroupNorm keeps the encoder independent of batch composition (DDP-safe, any batch size).
    """
    opts = {"channels": [16, 32, 64, 128], "num_groups": 8, **spec.options}
    channels = list(opts.pop("channels"))
    groups = int(opts.pop("num_groups"))
    if opts:
        raise TypeError(f"unknown options {sorted(opts)}")
    layers: list[nn.Module] = []
    c_in = spec.in_channels
    for c in channels:
        layers.append(
            ResidualUnit(
                spec.spatial_dims,
                c_in,
                c,
                strides=2,
                subunits=2,
                norm=("group", {"num_groups": min(groups, c)}),
            )
        )
        c_in = c
    return Encoder(nn.Sequential(*layers), channels[-1], spec)


class _ResNetBackbone(nn.Module):
    """MONAI ResNet up to ``layer4`` (no pooling, no classifier): a dense stride-16/32 map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


@register_encoder("resnet")
def resnet(spec: EncoderSpec) -> Encoder:
    """MONAI ``ResNet`` (default depth 18; option ``depth`` in 10/18/34/50) as a dense encoder."""
    from monai.networks.nets import resnet as monai_resnet

    opts = {"depth": 18, "conv1_t_stride": 2, "no_max_pool": False, **spec.options}
    depth = int(opts.pop("depth"))
    factory = getattr(monai_resnet, f"resnet{depth}", None)
    if factory is None:
        raise TypeError(f"unsupported ResNet depth {depth}")
    net = factory(
        spatial_dims=spec.spatial_dims,
        n_input_channels=spec.in_channels,
        feed_forward=False,
        **opts,
    )
    feat = net.layer4[-1].conv3.out_channels if depth >= 50 else net.layer4[-1].conv2.out_channels
    return Encoder(_ResNetBackbone(net), int(feat), spec)


class _LastFeature(nn.Module):
    """Wrap a MONAI encoder that returns a list of maps; keep the deepest one."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


@register_encoder("segresnet")
def segresnet(spec: EncoderSpec) -> Encoder:
    """MONAI ``SegResEncoder`` (the encoder of SegResNetDS); deepest map, stride 8."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    opts = {"init_filters": 16, "blocks_down": (1, 2, 2, 4), "norm": "instance", **spec.options}
    opts["blocks_down"] = tuple(opts["blocks_down"])
    net = SegResEncoder(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, **opts)
    feat = opts["init_filters"] * 2 ** (len(opts["blocks_down"]) - 1)
    return Encoder(_LastFeature(net), int(feat), spec)


@register_encoder("swinunetr")
def swinunetr(spec: EncoderSpec) -> Encoder:
    """The Swin transformer encoder of MONAI's ``SwinUNETR`` (stride 32 map).

    Input sizes must be divisible by 32. Options: ``feature_size`` (24), ``depths``,
    ``num_heads``, ``window_size`` (7).
    """
    from monai.networks.nets.swin_unetr import SwinTransformer

    opts = {
        "feature_size": 24,
        "depths": (2, 2, 2, 2),
        "num_heads": (3, 6, 12, 24),
        "window_size": 7,
        **spec.options,
    }
    fs = int(opts.pop("feature_size"))
    d = spec.spatial_dims
    net = SwinTransformer(
        in_chans=spec.in_channels,
        embed_dim=fs,
        window_size=(int(opts.pop("window_size")),) * d,
        patch_size=(2,) * d,
        depths=tuple(opts.pop("depths")),
        num_heads=tuple(opts.pop("num_heads")),
        spatial_dims=d,
        **opts,
    )
    return Encoder(_LastFeature(net), fs * 16, spec)
