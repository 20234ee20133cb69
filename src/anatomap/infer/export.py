"""``anatomap export``: a pretrained encoder as a MONAI network or a standalone module.

Targets:

- ``monai-unet``: :class:`monai.networks.nets.UNet` for ``small_cnn`` encoders. Their stages
  are the down path of MONAI's UNet (``ResidualUnit``, stride 2, ``subunits=2``, GroupNorm),
  so each stage's weights go into the matching down layer; the bottom layer and the decoder
  keep a seeded fresh initialisation.
- ``swinunetr``: :class:`monai.networks.nets.SwinUNETR` for ``swinunetr`` encoders (the
  encoder *is* ``SwinUNETR.swinViT``); the convolutional encoder blocks and the decoder are
  fresh.
- ``torchscript``: the whole encoder traced to TorchScript, ``forward(x) -> (features,
  pooled)``, usable without anatomap.

The MONAI targets write the network's full ``state_dict`` as safetensors (pretrained encoder
weights in place, the rest freshly initialised), and a JSON sidecar (``FILE`` with suffix
``.json``) with the network class, its constructor arguments, the key map and the input the
encoder expects (modalities, spacing, intensity presets). Every encoder weight must land in
the network: a key with no counterpart, or of another shape, stops the export. The only
weights left out on purpose are the pooled-embedding projection ``proj.*``, which a
segmentation network does not have (listed under ``not_exported``).
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from anatomap.checkpoint import load_checkpoint
from anatomap.errors import AnatomapError
from anatomap.io.atomic import atomic_path, atomic_write_json
from anatomap.models.encoders import Encoder

FORMAT = "anatomap-export"
FORMAT_VERSION = 1
TARGETS = ("monai-unet", "swinunetr", "torchscript")

_PROJ_REASON = "pooled-embedding projection (Encoder.proj): no counterpart in the network"


class ExportError(AnatomapError):
    """The checkpoint cannot be exported to the asked target."""


@dataclass
class Transfer:
    """A MONAI network with the encoder's weights placed in it."""

    network: nn.Module
    network_class: str  # dotted name under monai.networks.nets
    kwargs: dict[str, Any]
    key_map: dict[str, str]  # encoder state_dict key -> network state_dict key
    not_exported: dict[str, str] = field(default_factory=dict)  # encoder key -> reason


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    target: str
    matched: int  # encoder tensors placed in the exported network / module
    not_exported: dict[str, str]


# --------------------------------------------------------------------------------------------
# Encoder -> MONAI network maps
# --------------------------------------------------------------------------------------------


def _unet_down_prefixes(n: int) -> list[str]:
    """State-dict prefixes of the first ``n`` down layers of a MONAI ``UNet``: its model is
    ``Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)), up)``."""
    out, prefix = [], "model"
    for _ in range(n):
        out.append(f"{prefix}.0")
        prefix = f"{prefix}.1.submodule"
    return out


def unet_transfer(
    encoder: Encoder, out_channels: int | None = None, bottom_channels: int | None = None
) -> Transfer:
    """MONAI ``UNet`` whose down path is the ``small_cnn`` encoder's stages.

    The UNet has one down layer per stage (stride 2, two subunits, the same GroupNorm) and a
    stride-1 bottom layer of ``bottom_channels`` (default: twice the deepest stage). MONAI's
    UNet normalises its output layer too, so ``out_channels`` must be a multiple of the
    GroupNorm group count (default: that count; add a 1x1 convolution for other class
    counts, see docs/export.md).
    """
    from monai.networks.nets import UNet

    spec = encoder.spec
    if spec.name != "small_cnn":
        raise ExportError(
            f"encoder '{spec.name}' has no MONAI UNet counterpart (monai-unet takes small_cnn "
            "encoders, swinunetr takes swinunetr encoders); export it with --to torchscript"
        )
    opts = {"channels": [16, 32, 64, 128], "num_groups": 8, **spec.options}
    channels = [int(c) for c in opts["channels"]]
    groups = int(opts["num_groups"])
    if any(c < groups or c % groups for c in channels):
        raise ExportError(
            f"small_cnn channels {channels} with num_groups {groups}: MONAI's UNet uses one "
            "GroupNorm group count for every layer, so each stage's channels must be a "
            f"multiple of {groups}"
        )
    out_channels = groups if out_channels is None else int(out_channels)
    bottom = 2 * channels[-1] if bottom_channels is None else int(bottom_channels)
    for what, c in (("out_channels", out_channels), ("bottom_channels", bottom)):
        if c < 1 or c % groups:
            raise ExportError(
                f"{what}={c}: MONAI's UNet applies GroupNorm({groups}) to this layer too, so "
                f"it must be a multiple of {groups}; export with --out-channels {groups} and "
                "put a 1x1 convolution to your classes on top (docs/export.md)"
            )
    kwargs: dict[str, Any] = {
        "spatial_dims": spec.spatial_dims,
        "in_channels": spec.in_channels,
        "out_channels": out_channels,
        "channels": [*channels, bottom],
        "strides": [2] * len(channels),
        "kernel_size": 3,
        "up_kernel_size": 3,
        "num_res_units": 2,
        "act": "prelu",
        "norm": ["group", {"num_groups": groups}],
        "dropout": 0.0,
        "bias": True,
        "adn_ordering": "NDA",
    }
    net = UNet(**kwargs)
    key_map: dict[str, str] = {}
    not_exported: dict[str, str] = {}
    prefixes = _unet_down_prefixes(len(channels))
    for key in encoder.state_dict():
        parts = key.split(".")
        if parts[:2] == ["backbone", "stages"] and parts[2].isdigit():
            key_map[key] = f"{prefixes[int(parts[2])]}.{'.'.join(parts[3:])}"
        elif parts[0] == "proj":
            not_exported[key] = _PROJ_REASON
        else:
            key_map[key] = f"<no UNet counterpart for {key}>"
    return Transfer(net, "UNet", kwargs, key_map, not_exported)


# SwinTransformer options of the encoder -> SwinUNETR constructor arguments.
_SWIN_PASSTHROUGH = {
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "drop_rate": "drop_rate",
    "attn_drop_rate": "attn_drop_rate",
    "drop_path_rate": "dropout_path_rate",
    "patch_norm": "patch_norm",
    "use_checkpoint": "use_checkpoint",
    "downsample": "downsample",
    "use_v2": "use_v2",
}


def swinunetr_transfer(encoder: Encoder, out_channels: int | None = None) -> Transfer:
    """MONAI ``SwinUNETR`` whose ``swinViT`` is the ``swinunetr`` encoder's Swin transformer."""
    from monai.networks.nets import SwinUNETR

    spec = encoder.spec
    if spec.name != "swinunetr":
        raise ExportError(
            f"encoder '{spec.name}' has no SwinUNETR counterpart (swinunetr takes swinunetr "
            "encoders, monai-unet takes small_cnn encoders); export it with --to torchscript"
        )
    opts = {
        "feature_size": 24,
        "depths": (2, 2, 2, 2),
        "num_heads": (3, 6, 12, 24),
        "window_size": 7,
        **spec.options,
    }
    for generic in _GENERIC_OPTIONS:  # handled by build_encoder, checked in transfer()
        opts.pop(generic, None)
    fs = int(opts.pop("feature_size"))
    if fs % 12:
        raise ExportError(f"feature_size {fs}: MONAI's SwinUNETR needs a multiple of 12")
    kwargs: dict[str, Any] = {
        "in_channels": spec.in_channels,
        "out_channels": 2 if out_channels is None else int(out_channels),
        "feature_size": fs,
        "depths": [int(d) for d in opts.pop("depths")],
        "num_heads": [int(h) for h in opts.pop("num_heads")],
        "window_size": int(opts.pop("window_size")),
        "spatial_dims": spec.spatial_dims,
        "normalize": True,
    }
    unknown = sorted(k for k in opts if k not in _SWIN_PASSTHROUGH)
    if unknown:
        raise ExportError(f"swinunetr encoder options {unknown} have no SwinUNETR counterpart")
    kwargs.update({_SWIN_PASSTHROUGH[k]: v for k, v in opts.items()})
    net = SwinUNETR(**kwargs)
    key_map: dict[str, str] = {}
    not_exported: dict[str, str] = {}
    for key in encoder.state_dict():
        if key.startswith("backbone.net."):
            key_map[key] = "swinViT." + key.removeprefix("backbone.net.")
        elif key.startswith("proj."):
            not_exported[key] = _PROJ_REASON
        else:
            key_map[key] = f"<no SwinUNETR counterpart for {key}>"
    return Transfer(net, "SwinUNETR", kwargs, key_map, not_exported)


# Options every encoder takes (models/encoders.py:build_encoder), not the backbone's own.
_GENERIC_OPTIONS = ("modality_fusion", "stem_channels")

_TRANSFERS: dict[str, Callable[..., Transfer]] = {
    "monai-unet": unet_transfer,
    "swinunetr": swinunetr_transfer,
}


def transfer(encoder: Encoder, target: str, seed: int = 0, **kwargs: Any) -> Transfer:
    """Build the ``target`` network (seeded) and copy the encoder's weights into it.

    Raises :class:`ExportError` unless every encoder tensor (but ``proj.*``) lands on a
    network tensor of the same shape.
    """
    if target not in _TRANSFERS:
        raise ExportError(f"unknown MONAI target '{target}'; choose from {sorted(_TRANSFERS)}")
    fusion = encoder.spec.options.get("modality_fusion", "stack")
    if fusion != "stack":
        raise ExportError(
            f"encoder '{encoder.spec.name}' with modality_fusion={fusion}: its per-modality "
            "stems have no counterpart in a MONAI network; export it with --to torchscript"
        )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        tr = _TRANSFERS[target](encoder, **kwargs)
    finally:
        torch.random.set_rng_state(state)
    net_state = tr.network.state_dict()
    enc_state = encoder.state_dict()
    problems = []
    for src, dst in tr.key_map.items():
        if dst not in net_state:
            problems.append(f"{src} -> {dst} (no such network key)")
        elif net_state[dst].shape != enc_state[src].shape:
            problems.append(
                f"{src} {tuple(enc_state[src].shape)} -> {dst} {tuple(net_state[dst].shape)}"
            )
    unaccounted = sorted(set(enc_state) - set(tr.key_map) - set(tr.not_exported))
    problems += [f"{k} (not mapped)" for k in unaccounted]
    if len(set(tr.key_map.values())) != len(tr.key_map):
        problems.append("two encoder tensors map to one network tensor")
    if problems:
        raise ExportError(
            f"encoder '{encoder.spec.name}' does not fit {tr.network_class}: "
            f"{len(problems)} tensor(s) unmatched, e.g. {'; '.join(problems[:3])}"
        )
    for src, dst in tr.key_map.items():
        net_state[dst] = enc_state[src].detach().clone()
    tr.network.load_state_dict(net_state, strict=True)
    return tr


# --------------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------------


class EncoderModule(nn.Module):
    """The encoder with a plain tuple output ``(features, pooled)`` (TorchScript-friendly)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(x)
        return out.features, out.pooled


def example_size(encoder: Encoder, size: int | None = None) -> tuple[int, ...]:
    """Spatial size of the tracing input: ``size`` rounded up to the largest stride
    (default: twice the largest stride)."""
    m = int(max(encoder.pyramid_strides))
    n = 2 * m if size is None else max(m, -(-int(size) // m) * m)
    return (n,) * encoder.spatial_dims


def to_torchscript(encoder: Encoder, size: int | None = None) -> torch.jit.ScriptModule:
    """Trace the encoder (eval mode) on a ``[1, C, *size]`` input."""
    module = EncoderModule(encoder).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((1, encoder.in_channels, *example_size(encoder, size)), generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        # GroupNorm's "more than one value per channel" check is traced as a constant: it
        # holds for any input of at least the tracing size (check_trace re-runs the trace).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, x, check_trace=True)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _sidecar(out: Path) -> Path:
    return out.with_suffix(".json")


def _save_torchscript(
    encoder: Encoder, size: int | None, info: dict[str, Any], path: Path
) -> tuple[int, dict[str, Any]]:
    """Trace ``encoder`` into ``path`` (``info`` updated and embedded); matched, not exported."""
    module = to_torchscript(encoder, size)
    info.update(
        {
            "outputs": ["features", "pooled"],
            "traced_size": list(example_size(encoder, size)),
            "matched": len(encoder.state_dict()),
            "not_exported": {},
        }
    )
    torch.jit.save(module, str(path), _extra_files={"anatomap.json": json.dumps(info)})
    return len(encoder.state_dict()), {}


def _save_monai(
    encoder: Encoder, to: str, out_channels: int | None, seed: int, info: dict, path: Path
) -> tuple[int, dict[str, Any]]:
    """Transfer ``encoder`` into the MONAI network ``to``, saved to ``path`` (safetensors)."""
    tr = transfer(encoder, to, seed=seed, out_channels=out_channels)
    info.update(
        {
            "network": f"monai.networks.nets.{tr.network_class}",
            "kwargs": tr.kwargs,
            "seed": seed,
            "pretrained_keys": sorted(tr.key_map.values()),
            "key_map": tr.key_map,
            "not_exported": tr.not_exported,
            "matched": len(tr.key_map),
        }
    )
    state = {k: v.detach().contiguous() for k, v in tr.network.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "network": info["network"]})
    return len(tr.key_map), tr.not_exported


def export_checkpoint(
    checkpoint: str | Path,
    to: str,
    out: str | Path,
    *,
    out_channels: int | None = None,
    size: int | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export a checkpoint's encoder (see the module docstring); returns what was written."""
    if to not in TARGETS:
        raise ExportError(f"unknown export target '{to}'; choose from {', '.join(TARGETS)}")
    ckpt = load_checkpoint(checkpoint)
    encoder = ckpt.encoder.eval()
    out = Path(out)
    data = ckpt.meta.get("data", {})
    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": to,
        "checkpoint": str(ckpt.path),
        "objective": ckpt.meta.get("objective"),
        "step": ckpt.meta.get("step"),
        "code_version": ckpt.meta.get("code_version"),
        "encoder": ckpt.meta.get("encoder"),
        "input": {
            "modalities": data.get("modalities"),
            "spacing": data.get("spacing"),
            "preprocessing": data.get("preprocessing"),
            "orientation": "RAS",
            "size_multiple": int(max(encoder.pyramid_strides)),
        },
    }
    with atomic_path(out, what="export") as tmp:  # a failed export leaves no temporary file
        if to == "torchscript":
            matched, not_exported = _save_torchscript(encoder, size, info, tmp)
        else:
            matched, not_exported = _save_monai(encoder, to, out_channels, seed, info, tmp)
    atomic_write_json(_sidecar(out), info, what="export sidecar")
    return ExportResult(out, _sidecar(out), to, matched, not_exported)


def read_export_info(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of an export (``FILE`` with suffix ``.json``)."""
    side = _sidecar(Path(path))
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{side}: not a readable export sidecar ({exc})") from None
    if info.get("format") != FORMAT:
        raise ExportError(f"{side}: not an anatomap export")
    return info


def load_export(path: str | Path) -> nn.Module:
    """Rebuild an exported MONAI network from its sidecar and load its weights (strict).

    Plain MONAI does the same in three lines (docs/export.md); only classes of
    ``monai.networks.nets`` are built.
    """
    info = read_export_info(path)
    if info["target"] == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    module_name, _, cls_name = info["network"].rpartition(".")
    if module_name != "monai.networks.nets":
        raise ExportError(f"{path}: network {info['network']} is not a MONAI network")
    net = getattr(importlib.import_module(module_name), cls_name)(**info["kwargs"])
    net.load_state_dict(load_file(str(path)), strict=True)
    return net
