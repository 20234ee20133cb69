"""``anatomap export``: a pretrained encoder as a MONAI network or a standalone module.

Targets:

- ``monai-unet``: :class:`monai.networks.nets.UNet` for ``small_cnn`` encoders. Their stages
  are the down path of MONAI's UNet (``ResidualUnit``, stride 2, ``subunits=2``, GroupNorm,
  PReLU), so stage *i* goes into down layer *i*. By default the UNet is the one that fits the
  encoder exactly and every encoder tensor lands; another UNet may be asked for (norm,
  channels, strides, ``num_res_units``, output channels, activation, dropout), and then what
  matches is copied.
- ``swinunetr``: :class:`monai.networks.nets.SwinUNETR` for ``swinunetr`` encoders (the
  encoder *is* ``SwinUNETR.swinViT``); the convolutional encoder blocks and the decoder are
  fresh.
- ``torchscript``: the whole encoder traced to TorchScript, ``forward(x) -> (features,
  pooled)``, usable without anatomap.

One matching rule serves the exports (:func:`transfer`) and networks built by the user
(:func:`transfer_into`): each encoder tensor has a structural counterpart (stage *i* -> down
layer *i*, same sub-key); it is copied when that key exists with the same shape, and is
otherwise reported with the reason. Every network tensor is either pretrained or keeps its
initialisation (seeded, for exports). Nothing fitting is an error; ``strict=True`` also
refuses any encoder tensor that does not fit. The pooled-embedding projection ``proj.*`` has
no counterpart by design (``not_exported``).

The MONAI targets write the network's full ``state_dict`` as safetensors, and a JSON sidecar
(``FILE`` with suffix ``.json``) with the network class, its constructor arguments, the
transfer report (pretrained / initialised keys, what was not transferred and why) and the
input the encoder expects (modalities, spacing, intensity presets).

Modules: ``export_networks`` (the network asked for), ``export_map`` (where each encoder
tensor goes, and the copy), ``export_report`` (:class:`TransferReport`).
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from anatomap.checkpoint import load_checkpoint
from anatomap.infer.export_map import place, plan_for
from anatomap.infer.export_networks import (
    NETWORKS,
    UNET_OPTIONS,
    build,
    swinunetr_kwargs,
    unet_kwargs,
    unet_norm,
)
from anatomap.infer.export_report import ExportError, TransferReport
from anatomap.io.atomic import atomic_path, atomic_write_json
from anatomap.models.encoders import Encoder

__all__ = [
    "FORMAT",
    "TARGETS",
    "UNET_OPTIONS",
    "ExportError",
    "ExportResult",
    "Transfer",
    "TransferReport",
    "export_checkpoint",
    "load_export",
    "read_export_info",
    "swinunetr_kwargs",
    "swinunetr_transfer",
    "to_torchscript",
    "transfer",
    "transfer_into",
    "unet_kwargs",
    "unet_norm",
    "unet_transfer",
]

FORMAT = "anatomap-export"
FORMAT_VERSION = 1
TARGETS = ("monai-unet", "swinunetr", "torchscript")


@dataclass
class Transfer:
    """A MONAI network built for the encoder, with what matches of its weights placed in it."""

    network: nn.Module
    network_class: str  # class name under monai.networks.nets
    kwargs: dict[str, Any]
    report: TransferReport

    @property
    def key_map(self) -> dict[str, str]:
        return self.report.key_map

    @property
    def not_exported(self) -> dict[str, str]:
        return self.report.not_exported


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    target: str
    matched: int  # encoder tensors placed in the exported network / module
    not_exported: dict[str, str]
    report: TransferReport | None = None  # MONAI targets: pretrained / initialised / why not


# --------------------------------------------------------------------------------------------
# Transfers
# --------------------------------------------------------------------------------------------


def transfer(
    encoder: Encoder, target: str, seed: int = 0, strict: bool = False, **kwargs: Any
) -> Transfer:
    """Build the ``target`` network (``kwargs``: :func:`unet_kwargs` /
    :func:`swinunetr_kwargs`; fresh layers seeded) and copy what matches of the encoder's
    weights into it (see the module docstring; ``strict``: everything must)."""
    if target not in NETWORKS:
        raise ExportError(f"unknown MONAI target '{target}'; choose from {sorted(NETWORKS)}")
    cls_name, make_kwargs = NETWORKS[target]
    net_kwargs = make_kwargs(encoder, **kwargs)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = build(cls_name, net_kwargs)
    finally:
        torch.random.set_rng_state(state)
    report = place(encoder, net, plan_for(encoder, net), strict=strict, seed=seed)
    return Transfer(net, cls_name, net_kwargs, report)


def unet_transfer(
    encoder: Encoder,
    out_channels: int | None = None,
    bottom_channels: int | None = None,
    *,
    seed: int = 0,
    strict: bool = False,
    **options: Any,
) -> Transfer:
    """The MONAI ``UNet`` asked for (``options``: :func:`unet_kwargs`) with the encoder's
    stages in it."""
    return transfer(encoder, "monai-unet", seed, strict, out_channels=out_channels,
                    bottom_channels=bottom_channels, **options)  # fmt: skip


def swinunetr_transfer(
    encoder: Encoder, out_channels: int | None = None, *, seed: int = 0, strict: bool = False
) -> Transfer:
    """MONAI ``SwinUNETR`` whose ``swinViT`` is the ``swinunetr`` encoder's Swin transformer."""
    return transfer(encoder, "swinunetr", seed, strict, out_channels=out_channels)


def transfer_into(
    network: nn.Module, source: Encoder | str | Path, *, strict: bool = False
) -> TransferReport:
    """Copy what matches of a pretrained encoder into a MONAI ``UNet`` (or ``SwinUNETR``)
    you built, in place; its other tensors keep their values.

    ``source``: an encoder, a loaded checkpoint, or a checkpoint path (run folder, checkpoint
    folder, shipped name). Returns the report (``print(report)`` for a summary). Raises
    :class:`ExportError` when nothing fits, and with ``strict`` when anything does not.

    >>> net = UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
    >>> print(anatomap.transfer_into(net, "brain-mri"))
    """
    if isinstance(source, Encoder):
        encoder = source
    elif isinstance(getattr(source, "encoder", None), Encoder):
        encoder = source.encoder  # a LoadedCheckpoint
    else:
        encoder = load_checkpoint(source).encoder
    return place(encoder, network, plan_for(encoder, network), strict=strict, seed=None)


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
    encoder: Encoder,
    to: str,
    options: dict[str, Any],
    seed: int,
    strict: bool,
    info: dict,
    path: Path,
) -> TransferReport:
    """Transfer ``encoder`` into the MONAI network ``to``, saved to ``path`` (safetensors)."""
    tr = transfer(encoder, to, seed=seed, strict=strict, **options)
    info.update(
        {
            "network": f"monai.networks.nets.{tr.network_class}",
            "kwargs": tr.kwargs,
            "seed": seed,
            "strict": strict,
            **tr.report.to_json(),
        }
    )
    if to == "monai-unet":  # the UNet's input must divide by the product of its strides
        info["input"]["size_multiple"] = math.prod(tr.kwargs["strides"])
    state = {k: v.detach().contiguous() for k, v in tr.network.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT, "network": info["network"]})
    return tr.report


def export_checkpoint(
    checkpoint: str | Path,
    to: str,
    out: str | Path,
    *,
    out_channels: int | None = None,
    size: int | None = None,
    seed: int = 0,
    strict: bool = False,
    channels: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
    num_res_units: int | None = None,
    norm: str | Sequence[Any] | None = None,
    act: str | Sequence[Any] | None = None,
    dropout: float | None = None,
) -> ExportResult:
    """Export a checkpoint's encoder (see the module docstring); returns what was written.

    ``channels`` ... ``dropout``: the UNet asked for (``monai-unet`` only; :func:`unet_kwargs`).
    """
    if to not in TARGETS:
        raise ExportError(f"unknown export target '{to}'; choose from {', '.join(TARGETS)}")
    given = {"channels": channels, "strides": strides, "num_res_units": num_res_units,
             "norm": norm, "act": act, "dropout": dropout}  # fmt: skip
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if options and to != "monai-unet":
        raise ExportError(f"{', '.join(options)}: options of --to monai-unet only")
    if out_channels is not None and to != "torchscript":
        options["out_channels"] = out_channels
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
    report = None
    with atomic_path(out, what="export") as tmp:  # a failed export leaves no temporary file
        if to == "torchscript":
            matched, not_exported = _save_torchscript(encoder, size, info, tmp)
        else:
            report = _save_monai(encoder, to, options, seed, strict, info, tmp)
            matched, not_exported = report.matched, report.not_exported
    atomic_write_json(_sidecar(out), info, what="export sidecar")
    return ExportResult(out, _sidecar(out), to, matched, not_exported, report)


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
