"""Dense embeddings of whole volumes (``anatomap embed``), saved with their affines.

A sliding window whose size and steps are multiples of the model's largest stride tiles the
volume, so every window's feature voxels fall on one global grid per level (see
:func:`anatomap.geometry.feature_affine`). Overlapping windows are blended with Gaussian
weights (less weight near window borders) and the blend is re-normalised to unit length.

The windows stream: they run in order along the first axis, and each level keeps its float32
blend only for the feature rows that the current windows reach (a ring one window deep); rows
no later window touches are normalised into the float16 maps (voxel-major, as
:func:`~anatomap.infer.match.match_points` reads them) at once. Memory: those maps + the
bands + one batch of windows (``benchmarks/embed_memory.py``).

Not MONAI's ``SlidingWindowInferer``: side by side on a 256^3 volume (default SAM model, 2 CPU
cores; ``python benchmarks/embed_memory.py --size 256 256 256 --impls old monai new``,
docs/benchmarks.md) it took 20.2 s and 1.53 GB above the model, this path 11.4 s and 0.78 GB.
It stitches each output into full-size float32 maps plus count maps before anything can be
normalised (``buffer_steps`` buffers a network's first output only), and it puts its last
window at the image's end, off the stride grid unless the volume is padded first.

Inference runs under ``torch.inference_mode`` on ``device`` (:mod:`anatomap.infer.device`),
optionally under bf16/fp16 autocast (``precision``), with channels-last 3-D tensors and a
``torch.compile``-d network; CPU threads are torch's (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from anatomap import geometry
from anatomap.checkpoint import LoadedCheckpoint, load_checkpoint, load_objective
from anatomap.data.preprocess import IntensityPreset, preprocess
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError, CheckpointError
from anatomap.infer.device import autocast, memory_format, resolve_device, resolve_precision
from anatomap.io import read_volume
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import DenseObjective

EMBEDDING_SUFFIX = ".emb.safetensors"


@dataclass
class DenseEmbedding:
    """Coarse and fine embedding maps ``[D, *s]`` (unit length) with their world affines.

    :func:`embed_array` and :meth:`load` give float16 maps stored voxel-major (each voxel's
    ``D`` values together); matching reads any float dtype and layout."""

    coarse: torch.Tensor
    fine: torch.Tensor
    coarse_affine: np.ndarray
    fine_affine: np.ndarray
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()
    image_affine: np.ndarray | None = None

    def save(self, path: str | Path) -> Path:
        """Write ``.emb.safetensors`` (float16 maps, affines as metadata) atomically."""
        from anatomap.io.atomic import atomic_path

        path = Path(path)
        info = {
            "coarse_affine": self.coarse_affine.tolist(),
            "fine_affine": self.fine_affine.tolist(),
            "source": self.source,
            "image_shape": list(self.image_shape),
            "image_affine": None if self.image_affine is None else self.image_affine.tolist(),
            "meta": self.meta,
        }
        with atomic_path(path, what="embedding") as tmp:
            save_file(
                # float16: unit vectors lose < 1e-3 in cosine similarity. The fine map
                # voxel-major, as match_points reads it (no copy when it is stored so).
                {
                    "coarse": self.coarse.half().contiguous(),
                    "fine_voxel_major": self.fine.half().movedim(0, -1).contiguous(),
                },
                str(tmp),
                metadata={"anatomap": json.dumps(info)},
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> DenseEmbedding:
        """Read a saved embedding: float16 maps, voxel-major. Files of older versions (float32
        maps, or the fine map channel-first under ``"fine"``) load the same way."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                info = json.loads((fh.metadata() or {})["anatomap"])
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own types
            raise AnatomapError(f"{path}: not an anatomap embedding file ({exc})") from None
        img_aff = info.get("image_affine")
        coarse = voxel_major(tensors["coarse"].half())
        fine = (
            tensors["fine_voxel_major"].half().movedim(-1, 0)
            if "fine_voxel_major" in tensors
            else voxel_major(tensors["fine"].half())
        )
        if not (torch.isfinite(coarse).all() and torch.isfinite(fine).all()):
            raise AnatomapError(f"{path}: embedding holds NaN or infinite values; re-embed it")
        return cls(
            coarse,
            fine,
            np.asarray(info["coarse_affine"]),
            np.asarray(info["fine_affine"]),
            info.get("source", ""),
            info.get("meta", {}),
            tuple(info.get("image_shape", ())),
            None if img_aff is None else np.asarray(img_aff),
        )


def voxel_major(x: torch.Tensor) -> torch.Tensor:
    """``x [D, *s]`` with each voxel's D values stored together (same shape, other strides):
    :func:`~anatomap.infer.match.match_points` reads its voxel rows without copying it."""
    return x.movedim(0, -1).contiguous().movedim(-1, 0)


class DenseModel:
    """A checkpoint whose objective produces dense coarse/fine maps (SAM and its kin)."""

    def __init__(
        self, encoder: Encoder, objective: DenseObjective, ckpt: LoadedCheckpoint | None = None
    ) -> None:
        self.ckpt = ckpt
        self.encoder = encoder.eval()
        self.objective = objective.eval()
        self.strides: tuple[int, int] = tuple(objective.strides)  # (coarse, fine)
        self.max_stride = int(max(encoder.pyramid_strides))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> DenseModel:
        ckpt = load_checkpoint(path)
        objective = load_objective(ckpt)
        if not isinstance(objective, DenseObjective):
            raise CheckpointError(
                f"{ckpt.path}: trained with '{ckpt.meta['objective']}', which gives no dense "
                "per-voxel embeddings; embed/match need a dense checkpoint (e.g. sam)"
            )
        return cls(ckpt.encoder, objective, ckpt)

    @property
    def meta(self) -> dict[str, Any]:
        return self.ckpt.meta if self.ckpt is not None else {}

    @property
    def source(self) -> str:
        return str(self.ckpt.path) if self.ckpt is not None else ""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.objective.dense(self.encoder, images)


# -- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedOptions:
    """Checked embedding options (:func:`check_options`); ``precision`` is the autocast
    dtype (``None``: float32)."""

    window: int = 64
    overlap: float = 0.25
    batch_size: int = 2
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    progress: bool = False


def check_options(
    window: Any = 64,
    overlap: Any = 0.25,
    batch_size: Any = 2,
    device: Any = "auto",
    precision: Any = "auto",
    channels_last: Any = False,
    compile: Any = False,
    progress: Any = False,
    **_: Any,
) -> EmbedOptions:
    """Checked embedding options: ``window`` an integer in [1, MAX_WINDOW] voxels, ``overlap``
    a number in [0, 1), ``batch_size`` (windows per forward pass) an integer >= 1, ``device``
    (:func:`~anatomap.infer.device.resolve_device`: auto, cpu, cuda, cuda:N, mps; one this
    machine lacks is an error), ``precision`` (auto, fp32, bf16, fp16), and the flags
    ``channels_last``, ``compile``, ``progress``. Raises one line naming the option
    (``embed --overlap -1`` would blend windows that never meet: NaN maps)."""
    from anatomap import limits

    def integer(name: str, value: Any, hi: int) -> int:
        ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
        if not (ok and 1 <= value <= hi):
            raise AnatomapError(f"{name} {value!r}: must be an integer from 1 to {hi}")
        return int(value)

    def flag(name: str, value: Any) -> bool:
        if not isinstance(value, bool | np.bool_):
            raise AnatomapError(f"{name} {value!r}: must be true or false")
        return bool(value)

    try:
        ov = float(overlap)
    except (TypeError, ValueError):
        ov = math.nan
    if not 0 <= ov < 1:  # NaN fails too
        raise AnatomapError(f"overlap {overlap!r}: must be a number in [0, 1)")
    dev = resolve_device(device)
    return EmbedOptions(
        integer("window", window, limits.MAX_WINDOW),
        ov,
        integer("batch_size", batch_size, 1024),
        dev,
        resolve_precision(precision, dev),
        flag("channels_last", channels_last),
        flag("compile", compile),
        flag("progress", progress),
    )


# -- the sliding window -----------------------------------------------------------------------


def _starts(n: int, window: int, step: int) -> list[int]:
    if n <= window:
        return [0]
    count = math.ceil((n - window) / step) + 1
    return [i * step for i in range(count)]


def _gaussian(size: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    return torch.exp(-0.5 * (x / max(size / 4, 1.0)) ** 2)


def _ring(start: int, n: int, size: int) -> list[tuple[slice, slice]]:
    """Rows ``start .. start + n`` (``n <= size``) of a ring buffer of ``size`` rows as
    ``(ring rows, rows counted from start)`` pieces (two where they wrap around)."""
    first = start % size
    k = min(n, size - first)
    pieces = [(slice(first, first + k), slice(0, k))]
    return [*pieces, (slice(0, n - k), slice(k, n))] if k < n else pieces


class _Level:
    """One output level (``stride``): the float32 blend of the feature rows that windows
    starting at the current first-axis position reach (a ring of ``ws[0]`` rows) and the
    float16 map (voxel-major, on the CPU) that finished rows go to."""

    def __init__(
        self, stride: int, ws: Sequence[int], padded: Sequence[int], shape: Sequence[int], c: int
    ) -> None:
        self.stride, self.ws = stride, tuple(int(n) for n in ws)
        self.keep = [math.ceil(n / stride) for n in shape]
        size = [p // stride for p in padded]
        self.acc: torch.Tensor | None = None  # [C, ws0, Y, Z] on the compute device
        self.wsum: torch.Tensor | None = None
        self.size, self.channels, self.done = size, c, 0
        with torch.inference_mode(False):  # a normal tensor, free to edit afterwards
            self.out = torch.empty(*self.keep, c, dtype=torch.float16).movedim(-1, 0)

    def add(self, corner: Sequence[int], f: torch.Tensor) -> None:
        """Blend one window's map ``f [C, *ws]`` in at its voxel ``corner``."""
        if self.acc is None or self.wsum is None:
            dev = f.device
            self.acc = torch.zeros(self.channels, self.ws[0], *self.size[1:], device=dev)
            self.wsum = torch.zeros(self.ws[0], *self.size[1:], device=dev)
            g = [_gaussian(n, dev) for n in self.ws]
            self.weight = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        o = [int(c) // self.stride for c in corner]
        yz = (slice(o[1], o[1] + self.ws[1]), slice(o[2], o[2] + self.ws[2]))
        for ring, src in _ring(o[0], self.ws[0], self.ws[0]):
            w = self.weight[src]
            self.acc[(slice(None), ring, *yz)].addcmul_(f[:, src], w)
            self.wsum[(ring, *yz)] += w

    def finish(self, upto: int, rows: int = 4) -> None:
        """Rows ``[done, upto)`` are final: normalise them into the map, clear their ring."""
        assert self.acc is not None and self.wsum is not None
        k1, k2 = self.keep[1], self.keep[2]
        for ring, src in _ring(self.done, upto - self.done, self.ws[0]):
            for r in range(ring.start, ring.stop, rows):  # a few rows at a time: small temps
                lo = self.done + src.start + (r - ring.start)
                hi = min(lo + min(rows, ring.stop - r), self.keep[0])
                if hi > lo:
                    a = self.acc[:, r : r + hi - lo, :k1, :k2]
                    a.div_(self.wsum[r : r + hi - lo, :k1, :k2])
                    a.div_(torch.linalg.vector_norm(a, dim=0, keepdim=True).clamp_min_(1e-12))
                    self.out[:, lo:hi].copy_(a)
            self.acc[:, ring].zero_()
            self.wsum[ring].zero_()
        self.done = upto


def _cut(image: torch.Tensor, corner: Sequence[int], window: int) -> torch.Tensor:
    """The window at ``corner``, zero-padded where it passes the image's end."""
    a, b, c = corner
    x = image[:, a : a + window, b : b + window, c : c + window]
    pad = [window - n for n in x.shape[1:]]
    return F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0])) if any(pad) else x


def _forward(model: Any, opts: EmbedOptions) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The model on ``opts.device`` as a function of a batch of windows: memory format,
    autocast and ``torch.compile`` (cached on the model; the last batch is padded to a full
    one so that the compiled graph sees one shape)."""
    fmt = memory_format(opts.channels_last)
    for module in (model.encoder, model.objective):
        module.to(opts.device, memory_format=fmt)
    fn: Callable[[torch.Tensor], Any] = model
    if opts.compile:
        fn = getattr(model, "_anatomap_compiled", None) or torch.compile(model, dynamic=False)
        model._anatomap_compiled = fn

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        n = len(x)
        if opts.compile and n < opts.batch_size:
            x = torch.cat([x, x.new_zeros(opts.batch_size - n, *x.shape[1:])])
        x = x.to(opts.device, non_blocking=True).contiguous(memory_format=fmt)
        with autocast(opts.device, opts.precision):
            maps = fn(x)
        return [m[:n].float() for m in maps]

    return run


def _in_channels(model: Any) -> int | None:
    n = getattr(getattr(model, "encoder", None), "in_channels", None)
    return n if isinstance(n, int) else None


def input_channels(model: Any) -> int:
    """Channels to feed a scan in (the scan fills channel 0, the others stay zeros): the
    encoder's ``in_channels`` (1 for a model trained one modality per view, whatever its
    cache held), else one per modality the checkpoint records."""
    return _in_channels(model) or len(model.meta.get("data", {}).get("modalities") or [1])


def embed_array(
    model: DenseModel, image: np.ndarray, affine: np.ndarray, **options: Any
) -> DenseEmbedding:
    """Embed a preprocessed image ``[C, X, Y, Z]`` (the model's preprocessing already applied;
    ``C`` the encoder's input channels). ``options``: see :func:`check_options` (window 64,
    overlap 0.25, batch_size 2, device auto, precision auto, channels_last, compile and
    progress off). The maps come back float16, voxel-major, on the CPU."""
    opts = check_options(**options)
    if np.ndim(image) != 4:
        raise AnatomapError(f"image of shape {np.shape(image)}: expected [C, X, Y, Z]")
    n_in = _in_channels(model)
    if n_in is not None and image.shape[0] != n_in:
        raise AnatomapError(f"image has {image.shape[0]} channel(s); the model takes {n_in}")
    m = model.max_stride
    window = max(m, (opts.window // m) * m)
    step = max(m, int(window * (1 - opts.overlap)) // m * m)
    shape = tuple(int(n) for n in image.shape[1:])
    starts = [_starts(n, window, step) for n in shape]
    padded = [max(window, s[-1] + window) for s in starts]
    boxes = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    levels = _blend(
        model, torch.from_numpy(np.asarray(image, np.float32)), boxes, window, padded, opts
    )
    aff = np.asarray(affine, np.float64)
    return DenseEmbedding(
        coarse=levels[0].out,
        fine=levels[1].out,
        coarse_affine=geometry.feature_affine(aff, model.strides[0]),
        fine_affine=geometry.feature_affine(aff, model.strides[1]),
        meta={"checkpoint": model.source, "code_version": model.meta.get("code_version")},
        image_shape=shape,
        image_affine=aff,
    )


def _blend(
    model: Any,
    image: torch.Tensor,
    boxes: list[tuple[int, int, int]],
    window: int,
    padded: list[int],
    opts: EmbedOptions,
) -> list[_Level]:
    """Run the windows at ``boxes`` (first-axis major) in batches and blend their maps."""
    from tqdm.auto import tqdm

    forward = _forward(model, opts)
    levels: list[_Level] = []
    row = boxes[0][0]
    bar = tqdm(
        total=len(boxes), desc="windows", unit="win", file=sys.stderr, disable=not opts.progress
    )
    with torch.inference_mode(), bar:
        for i in range(0, len(boxes), opts.batch_size):
            chunk = boxes[i : i + opts.batch_size]
            maps = forward(torch.stack([_cut(image, c, window) for c in chunk]))
            if not levels:
                for stride, f in zip(model.strides, maps, strict=True):
                    if any(n * stride != window for n in f.shape[2:]):
                        raise AnatomapError(
                            f"model output {tuple(f.shape[2:])} for a {window}^3 window: "
                            f"not the window / its stride {stride}"
                        )
                    levels.append(_Level(stride, f.shape[2:], padded, image.shape[1:], f.shape[1]))
            for j, corner in enumerate(chunk):
                if corner[0] != row:  # every window of the last row is in: finish its rows
                    for lv in levels:
                        lv.finish(corner[0] // lv.stride)
                    row = corner[0]
                for lv, f in zip(levels, maps, strict=True):
                    lv.add(corner, f[j])
            bar.update(len(chunk))
        for lv in levels:
            lv.finish(row // lv.stride + lv.ws[0])
    return levels


def preprocess_for(model: DenseModel, volume: Volume) -> Volume:
    """Apply the checkpoint's recorded preprocessing (RAS+, spacing, intensity preset)."""
    data = model.meta.get("data", {})
    spacing = data.get("spacing")
    presets = data.get("preprocessing") or {}
    preset_d = (
        presets.get(volume.modality) or presets.get("*") or next(iter(presets.values()), None)
    )
    preset = IntensityPreset(**preset_d) if preset_d else None
    return preprocess(volume, spacing, preset)


def embed_file(
    model: DenseModel, path: str | Path, *, modality: str | None = None, **kwargs: Any
) -> DenseEmbedding:
    """Read a scan (any supported format), preprocess it as the model's data, embed it
    (``kwargs``: :func:`check_options`)."""
    check_options(**kwargs)  # before the scan is read
    modalities: Sequence[str] = model.meta.get("data", {}).get("modalities") or ["image"]
    vol = preprocess_for(model, read_volume(path, modality=modality or modalities[0]))
    image = np.zeros((input_channels(model), *vol.shape), np.float32)
    image[0] = vol.array
    emb = embed_array(model, image, vol.affine, **kwargs)
    emb.source = str(path)
    return emb


def load_or_embed(model: DenseModel, path: str | Path, **kwargs: Any) -> DenseEmbedding:
    """Reuse an embedding saved by ``anatomap embed`` (``*.emb.safetensors``) or embed a scan."""
    check_options(**kwargs)
    p = Path(path)
    if p.name.endswith(EMBEDDING_SUFFIX):
        emb = DenseEmbedding.load(p)
        made_by = emb.meta.get("checkpoint")
        if made_by and Path(made_by).resolve() != Path(model.source).resolve():
            raise AnatomapError(
                f"{p}: embedded with checkpoint {made_by}, not {model.source}; re-embed it"
            )
        return emb
    return embed_file(model, p, **kwargs)


def embedding_name(path: str | Path) -> str:
    """File name of a scan's saved embedding: ``<scan name without suffix>.emb.safetensors``."""
    from anatomap.io.readers import strip_suffix

    return Path(strip_suffix(Path(path).name)).name + EMBEDDING_SUFFIX


def embedding_names(paths: Sequence[str | Path]) -> list[str]:
    """Output names for the embeddings of ``paths`` that cannot collide: the scan's name
    (:func:`embedding_name`) when the names differ, else its path relative to the scans'
    common folder (``s0001/ct.nii.gz`` -> ``s0001/ct.emb.safetensors``), with the full file
    name kept where even that repeats (``ct.nii`` beside ``ct.nii.gz``)."""
    import os

    from anatomap.io.readers import strip_suffix

    names = [embedding_name(p) for p in paths]
    absolute = [os.path.abspath(p) for p in paths]
    if len(set(names)) == len(set(absolute)):
        return names
    common = os.path.commonpath([os.path.dirname(a) for a in absolute])
    rel = [os.path.relpath(a, common) for a in absolute]
    names = [str(Path(r).parent / strip_suffix(Path(r).name)) + EMBEDDING_SUFFIX for r in rel]
    if len(set(names)) != len(set(absolute)):
        names = [r + EMBEDDING_SUFFIX for r in rel]
    return [n.removeprefix("./") for n in names]
