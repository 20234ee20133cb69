"""Encoders over MONAI networks with one interface: a dense feature map and a pooled vector.

Every encoder is registered by name (a decorator registry in the style of timm) and built
from an :class:`EncoderSpec`, which a checkpoint stores so the encoder can be rebuilt for
fine-tuning (as nnssl's adaptation plans do).

Modalities: the input's channels are the cache's modalities, a missing one being an all-zero
channel. Every encoder accepts the option ``modality_fusion``: ``"stack"`` (default, the
channels go straight into the backbone) or ``"mean"`` (a stride-1 stem per modality, then the
mean over the modalities present in each sample, HeMIS-style, Havaei et al. MICCAI 2016;
``stem_channels`` sets its width). A channel that is zero everywhere in a sample counts as
missing (:func:`modality_presence`), so callers pass images only. docs/methods/topo.md gives
the measurement behind the choice for the ``topo`` recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from anatomap.errors import ConfigError
from anatomap.registry import Registry


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


class Backbone(nn.Module):
    """A network that returns its feature pyramid: maps of increasing stride.

    Subclasses set ``channels`` and ``strides`` (one entry per level, finest first) and
    implement :meth:`pyramid`.
    """

    channels: list[int]
    strides: list[int]

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pyramid(x)[-1]


FUSIONS = ("stack", "mean")


def modality_presence(images: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` bool: which channels of ``images [B, C, *S]`` hold anything (not all zero)."""
    return images.flatten(2).abs().amax(-1) > 0


class ModalityFusion(nn.Module):
    """One stride-1 convolution stem per modality, averaged over the modalities present.

    A missing modality (all-zero channel) does not enter the mean, so any subset of
    modalities gives features on the same scale (HeMIS, Havaei et al. 2016). A sample with
    no modality at all averages every stem (of zeros).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.stems = nn.ModuleList(
            [
                Convolution(spatial_dims, 1, out_channels, kernel_size=3, act="PRELU", norm=None)
                for _ in range(in_channels)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = modality_presence(x)
        present = present | ~present.any(1, keepdim=True)  # nothing present: use all
        w = present.to(x.dtype) / present.sum(1, keepdim=True).to(x.dtype)
        out = 0.0
        for c, stem in enumerate(self.stems):
            out = out + stem(x[:, c : c + 1]) * w[:, c].view(-1, *([1] * (x.ndim - 1)))
        return out  # type: ignore[return-value]


class Encoder(nn.Module):
    """A backbone producing a feature pyramid, global average pooling and a projection.

    ``features`` is the deepest map ``[B, feature_channels, *s]``; ``pooled`` is the
    projection of its spatial mean to ``embed_dim``; :meth:`pyramid` returns every level
    (finest first) for dense methods such as SAM.
    """

    def __init__(self, backbone: Backbone, spec: EncoderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.feature_channels = backbone.channels[-1]
        self.proj = nn.Linear(self.feature_channels, spec.embed_dim)
        self.fusion: nn.Module = nn.Identity()  # build_encoder sets ModalityFusion ("mean")

    @property
    def pyramid_channels(self) -> list[int]:
        return list(self.backbone.channels)

    @property
    def pyramid_strides(self) -> list[int]:
        return list(self.backbone.strides)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level, finest first (strides in ``pyramid_strides``)."""
        return self.backbone.pyramid(self.fusion(x))

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
        feats = self.backbone(self.fusion(x))
        pooled = self.proj(feats.flatten(2).mean(-1))
        return EncoderOutput(feats, pooled)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """The pooled embedding of a deepest-level map (as ``forward`` computes it)."""
        return self.proj(feats.flatten(2).mean(-1))


EncoderFactory = Callable[[EncoderSpec], Encoder]
ENCODERS: Registry[EncoderFactory] = Registry("encoder")  # built-ins are registered below


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: register a factory ``spec -> Encoder`` under ``name`` (once)."""
    return ENCODERS.register(name)


def list_encoders(filter: str | None = None) -> list[str]:
    """Registered encoder names, sorted (``filter``: fnmatch pattern such as ``"swin*"``)."""
    return ENCODERS.names(filter)


def build_encoder(spec: EncoderSpec) -> Encoder:
    """Build a registered encoder; unknown names and bad options give a ConfigError.

    The generic options ``modality_fusion`` (``stack`` | ``mean``) and ``stem_channels``
    (``mean`` only, default 16) are handled here for every encoder.
    """
    factory = ENCODERS.get(spec.name)
    opts = dict(spec.options)
    fusion = str(opts.pop("modality_fusion", "stack"))
    stem = opts.pop("stem_channels", 16)
    if fusion not in FUSIONS:
        raise ConfigError(f"encoder '{spec.name}': modality_fusion must be one of {FUSIONS}")
    inner = spec
    if fusion == "mean":
        inner = EncoderSpec(spec.name, spec.spatial_dims, int(stem), spec.embed_dim, opts)
    elif "stem_channels" in spec.options:
        raise ConfigError(f"encoder '{spec.name}': stem_channels needs modality_fusion=mean")
    else:
        inner = EncoderSpec(spec.name, spec.spatial_dims, spec.in_channels, spec.embed_dim, opts)
    try:
        enc = factory(inner)
    except TypeError as exc:
        raise ConfigError(f"encoder '{spec.name}': bad options {spec.options}: {exc}") from None
    enc.spec = spec
    if fusion == "mean":
        enc.fusion = ModalityFusion(spec.spatial_dims, spec.in_channels, int(stem))
    return enc


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
    return Encoder(_Staged(spec.spatial_dims, spec.in_channels, channels, groups), spec)


class _Staged(Backbone):
    """Stride-2 MONAI residual units; level ``i`` has stride ``2**(i+1)``."""

    def __init__(self, dims: int, in_channels: int, channels: list[int], groups: int) -> None:
        super().__init__()
        self.channels = list(channels)
        self.strides = [2 ** (i + 1) for i in range(len(channels))]
        stages = []
        c_in = in_channels
        for c in channels:
            stages.append(
                ResidualUnit(
                    dims,
                    c_in,
                    c,
                    strides=2,
                    subunits=2,
                    norm=("group", {"num_groups": min(groups, c)}),
                )
            )
            c_in = c
        self.stages = nn.ModuleList(stages)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class _ResNetBackbone(Backbone):
    """MONAI ResNet up to ``layer4`` (no pooling, no classifier): stem + four layers."""

    def __init__(self, net: nn.Module, channels: list[int], stem_stride: int) -> None:
        super().__init__()
        self.net = net
        self.channels = channels
        pool = 1 if net.no_max_pool else 2
        s1 = stem_stride * pool
        self.strides = [stem_stride, s1, s1 * 2, s1 * 4, s1 * 8]

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        stem = n.act(n.bn1(n.conv1(x)))
        x = stem if n.no_max_pool else n.maxpool(stem)
        l1 = n.layer1(x)
        l2 = n.layer2(l1)
        l3 = n.layer3(l2)
        return [stem, l1, l2, l3, n.layer4(l3)]


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

    def out_channels(layer: nn.Module) -> int:
        block = layer[-1]
        conv = block.conv3 if hasattr(block, "conv3") else block.conv2
        return int(conv.out_channels)

    channels = [int(net.conv1.out_channels)] + [
        out_channels(getattr(net, f"layer{i}")) for i in range(1, 5)
    ]
    stem_stride = int(opts["conv1_t_stride"])
    return Encoder(_ResNetBackbone(net, channels, stem_stride), spec)


class _ListBackbone(Backbone):
    """Wrap a MONAI encoder that already returns its list of maps (finest first)."""

    def __init__(self, net: nn.Module, channels: list[int], strides: list[int]) -> None:
        super().__init__()
        self.net = net
        self.channels = channels
        self.strides = strides

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))


@register_encoder("segresnet")
def segresnet(spec: EncoderSpec) -> Encoder:
    """MONAI ``SegResEncoder`` (the encoder of SegResNetDS); deepest map, stride 8."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    opts = {"init_filters": 16, "blocks_down": (1, 2, 2, 4), "norm": "instance", **spec.options}
    opts["blocks_down"] = tuple(opts["blocks_down"])
    net = SegResEncoder(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, **opts)
    n = len(opts["blocks_down"])
    channels = [int(opts["init_filters"]) * 2**i for i in range(n)]
    return Encoder(_ListBackbone(net, channels, [2**i for i in range(n)]), spec)


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
    channels = [fs * 2**i for i in range(5)]
    return Encoder(_ListBackbone(net, channels, [2 ** (i + 1) for i in range(5)]), spec)
