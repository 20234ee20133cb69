"""The MONAI network asked for by ``anatomap export`` (:mod:`anatomap.infer.export`).

:func:`unet_kwargs` checks and fills the ``UNet`` options (norm, channels, strides,
``num_res_units``, output channels, activation, dropout; by default the UNet that fits the
``small_cnn`` encoder exactly); :func:`swinunetr_kwargs` derives ``SwinUNETR``'s from the
``swinunetr`` encoder; :func:`build` builds either, MONAI's refusal as one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from anatomap.infer.export_map import no_counterpart, small_cnn_options
from anatomap.infer.export_report import ExportError
from anatomap.models.encoders import Encoder

UNET_OPTIONS = ("channels", "strides", "num_res_units", "norm", "act", "dropout")
"""Keyword options of the ``monai-unet`` target besides ``out_channels``."""

NORMS = "group, group:G, instance, instance:affine or batch"


def unet_norm(norm: str | Sequence[Any] | None, groups: int = 8) -> str | list[Any]:
    """MONAI's ``norm`` argument for ``group[:G]``, ``instance``, ``instance:affine`` or
    ``batch`` (``None`` and ``group``: GroupNorm with the encoder's ``groups``); a MONAI
    ``(name, {args})`` pair passes through."""
    if norm is None:
        return ["group", {"num_groups": groups}]
    if not isinstance(norm, str):
        name, args = norm
        return [str(name).lower(), dict(args)]
    name, _, arg = norm.strip().lower().partition(":")
    if name == "group":
        g = int(arg) if arg.isdigit() else groups if not arg else 0
        if g < 1:
            raise ExportError(f"norm '{norm}': the group count must be a positive integer")
        return ["group", {"num_groups": g}]
    if name == "instance" and arg in ("", "affine"):
        return ["instance", {"affine": True}] if arg else "instance"
    if name == "batch" and not arg:
        return "batch"
    raise ExportError(f"norm '{norm}': choose {NORMS}")


def _check_act(act: str | Sequence[Any] | None) -> None:
    if act is None:
        return
    from monai.networks.layers.utils import get_act_layer

    try:
        get_act_layer(act)
    except (ValueError, TypeError, KeyError, LookupError) as exc:
        raise ExportError(f"act={act!r}: {' '.join(str(exc).split())[:160]}") from None


def _check_groups(g: int, out: int, channels: list[int], derived: bool) -> None:
    """MONAI's UNet uses one GroupNorm group count for every layer, the output one too."""
    if out % g:
        raise ExportError(
            f"out_channels={out}: MONAI's UNet applies GroupNorm({g}) to its output layer "
            f"too, so it must be a multiple of {g}; choose another norm (instance, batch) "
            f"or out_channels={g} and a 1x1 convolution to your classes on top"
        )
    if any(c % g for c in channels):
        what = " (the encoder's stages and the bottom layer)" if derived else ""
        raise ExportError(
            f"channels={channels}{what}: GroupNorm({g}) needs each to be a multiple of "
            f"{g} (MONAI's UNet uses one group count for every layer); choose another "
            "norm (instance, batch) or group count (group:G)"
        )


def unet_kwargs(
    encoder: Encoder,
    out_channels: int | None = None,
    bottom_channels: int | None = None,
    *,
    channels: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
    num_res_units: int | None = None,
    norm: str | Sequence[Any] | None = None,
    act: str | Sequence[Any] | None = None,
    dropout: float | None = None,
) -> dict[str, Any]:
    """Constructor arguments of the MONAI ``UNet`` asked for, checked.

    Defaults give the UNet that fits the ``small_cnn`` encoder exactly: ``channels`` = the
    stages plus a bottom layer (``bottom_channels``, default twice the deepest stage),
    ``strides`` all 2, ``num_res_units=2``, the encoder's GroupNorm, PReLU, no dropout.
    ``channels`` is the full list, the bottom layer last (as in MONAI's tutorials).
    ``out_channels`` defaults to the group count with GroupNorm (MONAI's UNet normalises its
    output layer too, so it must be a multiple of it) and to 2 otherwise.
    """
    enc_channels, groups = small_cnn_options(encoder)
    norm_arg = unet_norm(norm, groups)
    if channels is None:
        bottom = 2 * enc_channels[-1] if bottom_channels is None else int(bottom_channels)
        net_channels = [*enc_channels, bottom]
    elif bottom_channels is not None:
        raise ExportError("give the bottom layer as the last entry of channels, not apart")
    else:
        net_channels = [int(c) for c in channels]
    if len(net_channels) < 2 or min(net_channels) < 1:
        raise ExportError(
            f"channels={net_channels}: a UNet needs two or more positive channel counts (the "
            "bottom layer last)"
        )
    n_down = len(net_channels) - 1
    net_strides = [2] * n_down if strides is None else [int(s) for s in strides]
    if len(net_strides) != n_down or min(net_strides) < 1:
        raise ExportError(
            f"strides={net_strides}: one positive stride per down layer, {n_down} for "
            f"channels={net_channels}"
        )
    _check_act(act)
    res_units = 2 if num_res_units is None else int(num_res_units)
    if res_units < 0:
        raise ExportError(f"num_res_units={res_units}: must be 0 or more")
    p = 0.0 if dropout is None else float(dropout)
    if not 0.0 <= p < 1.0:
        raise ExportError(f"dropout={p}: must be in [0, 1)")
    g = norm_arg[1].get("num_groups") if norm_arg[0] == "group" else None
    out = (g or 2) if out_channels is None else int(out_channels)
    if out < 1:
        raise ExportError(f"out_channels={out}: must be 1 or more")
    if g:
        _check_groups(g, out, net_channels, derived=channels is None)
    return {
        "spatial_dims": encoder.spec.spatial_dims,
        "in_channels": encoder.spec.in_channels,
        "out_channels": out,
        "channels": net_channels,
        "strides": net_strides,
        "kernel_size": 3,
        "up_kernel_size": 3,
        "num_res_units": res_units,
        "act": "prelu" if act is None else act,
        "norm": norm_arg,
        "dropout": p,
        "bias": True,
        "adn_ordering": "NDA",
    }


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

# Options every encoder takes (models/encoders.py:build_encoder), not the backbone's own.
_GENERIC_OPTIONS = ("modality_fusion", "stem_channels")


def swinunetr_kwargs(encoder: Encoder, out_channels: int | None = None) -> dict[str, Any]:
    """Constructor arguments of the ``SwinUNETR`` whose ``swinViT`` is the encoder's."""
    spec = encoder.spec
    if spec.name != "swinunetr":
        raise no_counterpart(encoder, "SwinUNETR")
    opts = {
        "feature_size": 24,
        "depths": (2, 2, 2, 2),
        "num_heads": (3, 6, 12, 24),
        "window_size": 7,
        **spec.options,
    }
    for generic in _GENERIC_OPTIONS:  # handled by build_encoder, checked in plan_for()
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
    return kwargs


NETWORKS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "monai-unet": ("UNet", unet_kwargs),
    "swinunetr": ("SwinUNETR", swinunetr_kwargs),
}


def build(cls_name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``monai.networks.nets.<cls_name>(**kwargs)``; MONAI's refusal as one line."""
    nets = importlib.import_module("monai.networks.nets")
    try:
        return getattr(nets, cls_name)(**kwargs)
    except (ValueError, TypeError, KeyError, LookupError, AssertionError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"MONAI cannot build this {cls_name}: {first}") from None
