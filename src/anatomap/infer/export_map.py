"""Where each encoder tensor goes in a MONAI network, and the copying
(:mod:`anatomap.infer.export`).

One rule for exports and for networks built by the user: each encoder tensor has one
structural counterpart (``small_cnn`` stage *i* -> ``UNet`` down layer *i*, same sub-key;
``swinunetr`` -> ``SwinUNETR.swinViT``). It is copied when that key exists with the same
shape, a unit's bias, norm and PReLU weights only along with its convolution weight; every
other encoder tensor is reported with the reason, every network tensor classified as
pretrained or initialised (:class:`~anatomap.infer.export_report.TransferReport`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from anatomap.infer.export_report import (
    GOES_WITH,
    NOT_WITH,
    Describe,
    ExportError,
    TransferReport,
    n_of,
    parts_text,
)
from anatomap.models.encoders import Encoder

PROJ_REASON = "pooled-embedding projection (Encoder.proj): no counterpart in the network"


@dataclass
class Plan:
    """Where each encoder tensor would go in one network, before shapes are checked."""

    targets: dict[str, str]  # encoder key -> its structural counterpart in the network
    unplaced: dict[str, str]  # encoder key -> why it has no counterpart at all
    not_exported: dict[str, str]
    explain: Callable[[str, str], str]  # (encoder key, absent network key) -> reason
    describe: Describe
    shape_hint: Callable[[str], str] = lambda key: ""  # why shapes differ, if known
    notes: Callable[[dict[str, str]], list[str]] = lambda copied: []
    depends: Callable[[str], str | None] = lambda key: None  # copied only if this one is


def no_counterpart(encoder: Encoder, network: str) -> ExportError:
    return ExportError(
        f"encoder '{encoder.spec.name}' has no {network} counterpart (monai-unet takes "
        "small_cnn encoders, swinunetr takes swinunetr encoders); export it with --to "
        "torchscript"
    )


def small_cnn_options(encoder: Encoder) -> tuple[list[int], int]:
    """A ``small_cnn`` encoder's stage channels and GroupNorm group count."""
    spec = encoder.spec
    if spec.name != "small_cnn":
        raise no_counterpart(encoder, "MONAI UNet")
    opts = {"channels": [16, 32, 64, 128], "num_groups": 8, **spec.options}
    return [int(c) for c in opts["channels"]], int(opts["num_groups"])


# --------------------------------------------------------------------------------------------
# small_cnn -> UNet
# --------------------------------------------------------------------------------------------


def unet_down_prefixes(n: int) -> list[str]:
    """State-dict prefixes of the first ``n`` down layers of a MONAI ``UNet``: its model is
    ``Sequential(down, SkipConnection(Sequential(down, SkipConnection(...), up)), up)``."""
    out, prefix = [], "model"
    for _ in range(n):
        out.append(f"{prefix}.0")
        prefix = f"{prefix}.1.submodule"
    return out


_UNET_KINDS = {"conv": "convolutions", "N": "norm weights", "A": "PReLU weights"}


def _unet_describe(key: str) -> tuple[str | None, str]:
    parts = key.split(".")
    if parts[:2] != ["backbone", "stages"] or not parts[2].isdigit():
        return None, key
    if parts[3] == "residual":
        return f"down layer {parts[2]}", "residual convolutions"
    kind = parts[-2] if parts[-3:-2] == ["adn"] else "conv"
    return f"down layer {parts[2]}", _UNET_KINDS.get(kind, kind)


def _unet_depends(enc_keys: set[str], key: str) -> str | None:
    """A unit's bias, norm and PReLU weights go with its convolution weight."""
    if _unet_describe(key)[0] is None:
        return None
    parts = key.split(".")
    unit = parts[:4] if parts[3] == "residual" else [*parts[:5], "conv"]
    dep = ".".join([*unit, "weight"])
    return dep if dep != key and dep in enc_keys else None


def _unet_explain(net: nn.Module, prefixes: list[str], src: str, dst: str) -> str:
    """Why the UNet has no ``dst`` for ``src``: its norm, activation, subunits, layer kind."""
    from monai.networks.blocks import ResidualUnit

    tail = src.split(".")[3:]
    try:
        down = net.get_submodule(prefixes[int(src.split(".")[2])])
        if not isinstance(down, ResidualUnit):
            return (
                f"no counterpart: num_res_units={net.num_res_units} makes the UNet's down "
                "layers single convolutions"
            )
        if tail[0] == "residual":
            return "no counterpart: the UNet's down layer has no residual convolution"
        if not hasattr(down.conv, tail[1]):
            return (
                f"no counterpart: num_res_units={net.num_res_units} gives the UNet's down "
                f"layers {n_of(len(down.conv), 'subunit')}"
            )
        adn = getattr(down.conv, tail[1]).adn
        if tail[2:4] == ["adn", "N"]:
            norm = getattr(adn, "N", None)
            if norm is None:
                return "no counterpart: the UNet's layers have no norm"
            name = type(norm).__name__
            hint = "; an affine instance norm has them" if "Instance" in name else ""
            return f"no counterpart: the UNet's {name} has no affine weights{hint}"
        if tail[2:4] == ["adn", "A"]:
            act = type(getattr(adn, "A", None)).__name__
            return f"no counterpart: the UNet's activation {act} has no weights"
    except (AttributeError, IndexError, ValueError):
        pass
    return f"no counterpart: the UNet has no tensor {dst}"


def _unet_shape_hint(mine: list[int], theirs: list[int], key: str) -> str:
    """The channel paths, for a stage whose in or out channels differ from its layer's."""
    i = int(key.split(".")[2])
    if mine[i : i + 2] == theirs[i : i + 2]:
        return ""
    return (
        f"the UNet's down layers are {'->'.join(map(str, mine))}, the encoder's stages "
        f"{'->'.join(map(str, theirs))}"
    )


def _unet_notes(encoder: Encoder, net: nn.Module, copied: dict[str, str]) -> list[str]:
    """What differs without showing in shapes: the norm the weights went into, strides."""
    out = []
    into: list[str] = []
    for src, dst in copied.items():
        if _unet_describe(src)[1] != "norm weights":
            continue
        mine = net.get_submodule(dst.rpartition(".")[0])
        theirs = encoder.get_submodule(src.rpartition(".")[0])
        name = type(mine).__name__
        if isinstance(mine, nn.GroupNorm):
            if mine.num_groups == theirs.num_groups:
                continue
            name += f"({mine.num_groups})"
        if name not in into:
            into.append(name)
    if into:
        groups = small_cnn_options(encoder)[1]
        out.append(
            f"norm weights copied from the encoder's GroupNorm({groups}) into the UNet's "
            f"{', '.join(into)}: the same per-channel scale and shift, another normalisation"
        )
    stages = {int(src.split(".")[2]) for src in copied if _unet_describe(src)[0] is not None}
    odd = sorted(i for i in stages if int(net.strides[i]) != 2)
    if odd:
        out.append(
            f"{parts_text([f'down layer {i}' for i in odd])}: stride "
            f"{', '.join(str(int(net.strides[i])) for i in odd)} in the UNet, 2 in the encoder"
        )
    return out


def unet_plan(encoder: Encoder, net: nn.Module) -> Plan:
    """Stage ``i`` of a ``small_cnn`` encoder -> down layer ``i`` of a MONAI ``UNet``."""
    enc_channels, _ = small_cnn_options(encoder)
    n_down = len(net.channels) - 1
    prefixes = unet_down_prefixes(n_down)
    targets: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    not_exported: dict[str, str] = {}
    for key in encoder.state_dict():
        parts = key.split(".")
        if parts[:2] == ["backbone", "stages"] and parts[2].isdigit():
            i = int(parts[2])
            if i < n_down:
                targets[key] = f"{prefixes[i]}.{'.'.join(parts[3:])}"
            else:
                unplaced[key] = f"no counterpart: the UNet has {n_of(n_down, 'down layer')}"
        elif parts[0] == "proj":
            not_exported[key] = PROJ_REASON
        else:
            unplaced[key] = "no counterpart: not part of the encoder's stages"
    mine = [int(net.in_channels), *(int(c) for c in net.channels[:-1])]
    theirs = [encoder.spec.in_channels, *enc_channels]
    return Plan(
        targets,
        unplaced,
        not_exported,
        explain=partial(_unet_explain, net, prefixes),
        describe=_unet_describe,
        shape_hint=partial(_unet_shape_hint, mine, theirs),
        notes=partial(_unet_notes, encoder, net),
        depends=partial(_unet_depends, set(encoder.state_dict())),
    )


# --------------------------------------------------------------------------------------------
# swinunetr -> SwinUNETR
# --------------------------------------------------------------------------------------------


def _swin_describe(key: str) -> tuple[str | None, str]:
    if key.startswith("backbone.net."):
        return "swinViT", "Swin transformer weights"
    return None, key


def swin_plan(encoder: Encoder, net: nn.Module) -> Plan:
    """A ``swinunetr`` encoder's transformer -> ``SwinUNETR.swinViT``."""
    if encoder.spec.name != "swinunetr":
        raise no_counterpart(encoder, "SwinUNETR")
    targets: dict[str, str] = {}
    unplaced: dict[str, str] = {}
    not_exported: dict[str, str] = {}
    for key in encoder.state_dict():
        if key.startswith("backbone.net."):
            targets[key] = "swinViT." + key.removeprefix("backbone.net.")
        elif key.startswith("proj."):
            not_exported[key] = PROJ_REASON
        else:
            unplaced[key] = "no counterpart: not part of the encoder's Swin transformer"
    return Plan(
        targets,
        unplaced,
        not_exported,
        explain=lambda src, dst: f"no counterpart: the SwinUNETR has no tensor {dst}",
        describe=_swin_describe,
    )


def plan_for(encoder: Encoder, network: nn.Module) -> Plan:
    """The map of ``encoder`` into ``network`` (a MONAI ``UNet`` or ``SwinUNETR``)."""
    from monai.networks.nets import SwinUNETR, UNet

    fusion = encoder.spec.options.get("modality_fusion", "stack")
    if fusion != "stack":
        raise ExportError(
            f"encoder '{encoder.spec.name}' with modality_fusion={fusion}: its per-modality "
            "stems have no counterpart in a MONAI network; export it with --to torchscript"
        )
    if isinstance(network, UNet):
        return unet_plan(encoder, network)
    if isinstance(network, SwinUNETR):
        return swin_plan(encoder, network)
    raise ExportError(
        f"{type(network).__name__}: pretrained weights go into monai.networks.nets.UNet "
        "(small_cnn encoders) or SwinUNETR (swinunetr encoders)"
    )


# --------------------------------------------------------------------------------------------
# The copy
# --------------------------------------------------------------------------------------------


def _fits(
    enc_state: dict[str, torch.Tensor], net_state: dict[str, torch.Tensor], plan: Plan, cls: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(encoder key -> network key that fits, encoder key -> why not), in encoder order."""
    copied: dict[str, str] = {}
    missed: dict[str, str] = {}
    for src in enc_state:
        dst = plan.targets.get(src)
        if src in plan.not_exported:
            continue
        if dst is None:
            missed[src] = plan.unplaced.get(src, "no counterpart in the network")
        elif dst not in net_state:
            missed[src] = plan.explain(src, dst)
        elif net_state[dst].shape != enc_state[src].shape:
            missed[src] = (
                f"shape differs: encoder {list(enc_state[src].shape)}, "
                f"{cls} {list(net_state[dst].shape)}"
            )
        else:
            copied[src] = dst
    for src in list(copied):
        dep = plan.depends(src)
        if dep is not None and dep not in copied:
            missed[src] = f"{GOES_WITH}{dep}{NOT_WITH}{missed[dep]}"
            del copied[src]
    if len(set(copied.values())) != len(copied):
        raise ExportError(f"two encoder tensors map to one {cls} tensor (a bug in the key map)")
    return copied, {k: missed[k] for k in enc_state if k in missed}


def place(
    encoder: Encoder, network: nn.Module, plan: Plan, *, strict: bool, seed: int | None
) -> TransferReport:
    """Copy each planned encoder tensor that fits into ``network`` (in place); report every
    encoder and network tensor. Raises before copying anything when nothing fits, or with
    ``strict``, when any encoder tensor (but ``not_exported``) does not."""
    enc_state = encoder.state_dict()
    net_state = network.state_dict()
    cls = type(network).__name__
    copied, missed = _fits(enc_state, net_state, plan, cls)
    dsts = set(copied.values())
    report = TransferReport(
        network_class=cls,
        key_map=copied,
        not_transferred=missed,
        not_exported=dict(plan.not_exported),
        pretrained_keys=[k for k in net_state if k in dsts],
        initialised_keys=[k for k in net_state if k not in dsts],
        seed=seed,
        notes=plan.notes(copied),
        describe=plan.describe,
        shape_hint=plan.shape_hint,
    )
    if not copied:
        raise ExportError(
            f"no encoder tensor fits this {cls}: {report.grouped_reasons(missed)}"
            if missed
            else f"the encoder has no tensor for this {cls}"
        )
    if strict and missed:
        raise ExportError(
            f"strict: {len(missed)} of {len(missed) + len(copied)} encoder tensors do not fit "
            f"this {cls}: {report.grouped_reasons(missed)} (without strict the other "
            f"{len(copied)} are transferred)"
        )
    with torch.no_grad():
        for src, dst in copied.items():
            net_state[dst].copy_(enc_state[src])
    return report
