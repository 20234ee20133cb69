"""The ``segmentation`` task: label-efficient fine-tuning of a U-Net on the checkpoint's encoder.

The evaluation protocol of self-supervised pretraining for 3-D medical segmentation
(Models Genesis, Zhou et al. 2021; Tang et al. 2022, Swin UNETR pretraining): initialise a
U-Net's encoder from the checkpoint, fine-tune the whole network on a few labelled volumes,
and compare with the same network trained from scratch under the same budget.

- Network (:class:`PyramidUNet`): the encoder's feature pyramid (``encoder.pyramid``) is the
  down path; the up path is MONAI's ``UnetUpBlock`` (transposed convolution, skip
  concatenation, two convolutions) per level, a stride-1 ``UnetBasicBlock`` skip from the
  image when the finest level is strided, and a ``UnetOutBlock`` (1x1 convolution).
- Labels (``seg_labels``): ``tissue`` (every class of the tissue map; the demo's 0
  background, 1 CSF, 2 grey matter, 3 white matter; the default) and ``atlas`` (background +
  the ``seg_regions`` largest atlas regions present in every fine-tuning subject; opt-in: at
  the default 40-step budget both initialisations still predict background only, since
  each region is under 1 % of the volume).
- Fine-tuning subjects: the checkpoint's training subjects (``meta["data"]["train_subjects"]``;
  otherwise cache subjects not evaluated) that have the label map, in a seeded order; the
  1-subject set is the first of the 3-subject set.
- Training: ``seg_steps`` AdamW steps (``seg_lr``), each on ``seg_batch`` crops of
  ``seg_crop`` voxels from one subject (cycling) by MONAI ``RandCropByPosNegLabeld`` (3:1
  centred on labelled voxels), MONAI ``DiceCELoss``. Pretrained and scratch runs use the
  same seed, crops and decoder initialisation.
- Scoring: MONAI ``sliding_window_inference`` over each held-out volume, argmax, MONAI
  ``DiceMetric`` per foreground class (classes absent from a subject's ground truth are
  skipped), averaged over subjects, then over classes.
- Device: training and inference on ``ctx.device`` (bf16 autocast on CUDA only).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from monai.networks.utils import one_hot
from monai.transforms import RandCropByPosNegLabeld, SpatialPad
from monai.transforms.utils import map_binary_to_indices
from torch import nn

from anatomap import geometry
from anatomap.data.cache import Cache
from anatomap.errors import AnatomapError
from anatomap.eval.region import DEFAULT_LABEL, atlas_names, largest_regions
from anatomap.eval.report import Section
from anatomap.eval.tasks import EvalContext, TaskResult, random_encoder, register_task
from anatomap.infer.device import autocast, resolve_device, resolve_precision
from anatomap.models.encoders import Encoder

TISSUE_LABEL = "tissue"


def _norm(channels: int) -> tuple[str, dict[str, int]]:
    return ("group", {"num_groups": math.gcd(8, channels)})


def upsample_logits(logits: torch.Tensor, shape: tuple[int, ...], stride: int) -> torch.Tensor:
    """Trilinear logits at full resolution from a map of ``stride``: output voxel ``o`` reads
    feature voxel ``o / stride`` (``geometry.feature_affine``, offset 0), clamped at the
    border."""
    if stride == 1 and tuple(logits.shape[2:]) == tuple(shape):
        return logits
    axes = [torch.arange(n, dtype=logits.dtype, device=logits.device) / stride for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    grid = geometry.grid_sample_coords(ijk, logits.shape[2:])
    grid = grid.expand(logits.shape[0], *grid.shape)
    return F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=True)


class PyramidUNet(nn.Module):
    """A U-Net whose down path is ``encoder.pyramid`` and whose up path is MONAI blocks.

    By default the up path ends at the encoder's finest level (stride 2 for ``small_cnn``)
    and the logits are upsampled (:func:`upsample_logits`): on a CPU the full-resolution
    convolutions took about 85 % of a training step's time. ``full_resolution`` adds
    a thin stride-1 ``UnetBasicBlock`` skip from the image and a last ``UnetUpBlock``.
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        full_resolution: bool = False,
        stem_channels: int = 8,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        dims = encoder.spatial_dims
        chans = encoder.pyramid_channels
        strides = encoder.pyramid_strides
        self.stem: nn.Module | None = None
        if strides[0] > 1 and full_resolution:  # a full-resolution skip from the image
            c = min(chans[0], stem_channels)
            self.stem = UnetBasicBlock(dims, encoder.in_channels, c, 3, 1, _norm(c))
            chans, strides = [c, *chans], [1, *strides]
        ups = []
        for i in range(len(chans) - 1, 0, -1):
            ratio = strides[i] // strides[i - 1]
            if ratio * strides[i - 1] != strides[i]:
                raise AnatomapError(f"encoder strides {strides} are not integer multiples")
            ups.append(UnetUpBlock(dims, chans[i], chans[i - 1], 3, 1, ratio, _norm(chans[i - 1])))
        self.ups = nn.ModuleList(ups)
        self.head = UnetOutBlock(dims, chans[0], num_classes)
        self.out_stride = strides[0]
        self.max_stride = max(strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.encoder.pyramid(x)
        if self.stem is not None:
            maps = [self.stem(x), *maps]
        y = maps[-1]
        for up, skip in zip(self.ups, reversed(maps[:-1]), strict=True):
            y = up(y, skip)
        return upsample_logits(self.head(y), tuple(x.shape[2:]), self.out_stride)


@dataclass
class SegVolume:
    """One subject: image ``[C, *S]`` float32 and class map ``[1, *S]`` int64 (padded)."""

    subject: str
    image: np.ndarray
    label: np.ndarray


def load_volumes(
    cache: Cache, subjects: list[str], label: str, mapping: dict[int, int] | None, crop: int
) -> list[SegVolume]:
    """Volumes and class maps, padded (MONAI ``SpatialPad``) to at least ``crop`` per axis.

    ``mapping`` sends label values to classes (others -> 0); ``None`` keeps the values.
    """
    pad = SpatialPad([crop] * 3)
    out = []
    for s in subjects:
        subj = cache[s]
        lab = np.asarray(subj.label(label)).astype(np.int64)
        if mapping is not None:
            lut = np.zeros(max(int(lab.max()), max(mapping)) + 1, np.int64)
            for k, v in mapping.items():
                lut[k] = v
            lab = lut[lab]
        img = np.asarray(pad(np.asarray(subj.image, np.float32)))
        out.append(SegVolume(s, img, np.asarray(pad(lab[None]))))
    return out


@dataclass
class SegBudget:
    steps: int = 40
    crop: int = 32
    batch: int = 4
    lr: float = 1e-3


def finetune(
    net: PyramidUNet,
    volumes: list[SegVolume],
    num_classes: int,
    budget: SegBudget,
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> list[float]:
    """Train ``net`` in place on crops of ``volumes`` on ``device`` (``precision``: autocast,
    auto = bf16 on CUDA only); returns the loss per step."""
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    net.to(dev)
    crop = RandCropByPosNegLabeld(
        keys=["image", "label"],
        label_key="label",
        spatial_size=[budget.crop] * 3,
        pos=3.0,
        neg=1.0,
        num_samples=budget.batch,
        fg_indices_key="fg",
        bg_indices_key="bg",
    )
    crop.set_random_state(seed)
    items = []
    for v in volumes:
        fg, bg = map_binary_to_indices(v.label > 0)
        if len(bg) == 0:
            bg = fg
        if len(fg) == 0:
            fg = bg
        items.append({"image": v.image, "label": v.label, "fg": fg, "bg": bg})
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=budget.lr, weight_decay=1e-4)
    net.train()
    losses = []
    for step in range(budget.steps):
        samples = crop(items[step % len(items)])
        x = torch.stack([torch.as_tensor(np.asarray(s["image"])) for s in samples]).float()
        y = torch.stack([torch.as_tensor(np.asarray(s["label"])) for s in samples]).long()
        with autocast(dev, dtype):
            loss = loss_fn(net(x.to(dev)), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses


@torch.no_grad()
def predict(
    net: PyramidUNet,
    image: np.ndarray,
    crop: int,
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> np.ndarray:
    """Class map ``[*S]`` of one volume by sliding windows of ``crop`` voxels (on ``device``,
    under ``precision``'s autocast; the map comes back as a CPU array)."""
    dev = resolve_device(device)
    x = torch.as_tensor(image)[None].float().to(dev)
    net.to(dev)
    with autocast(dev, resolve_precision(precision, dev)):
        logits = sliding_window_inference(x, [crop] * 3, 8, net, overlap=0.25, mode="gaussian")
    return logits.argmax(1)[0].cpu().numpy()


def dice_per_class(
    preds: list[np.ndarray], truths: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """MONAI ``DiceMetric`` per foreground class, averaged over volumes (empty truths skipped).

    ``preds`` and ``truths`` are class maps ``[*S]``; returns ``[num_classes - 1]`` (NaN where
    no volume has the class).
    """
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    for p, t in zip(preds, truths, strict=True):
        metric(
            one_hot(torch.as_tensor(p)[None, None], num_classes),
            one_hot(torch.as_tensor(t).reshape(1, 1, *p.shape), num_classes),
        )
    per_volume = metric.get_buffer().numpy().astype(np.float64)  # [volumes, classes], NaN empty
    seen = np.isfinite(per_volume).any(axis=0)
    out = np.full(per_volume.shape[1], np.nan)
    out[seen] = np.nanmean(per_volume[:, seen], axis=0)
    return out


def finetune_subjects(ctx: EvalContext, label: str) -> list[str]:
    """Subjects that may be labelled for fine-tuning, in a seeded order."""
    pool = ctx.meta.get("data", {}).get("train_subjects")
    if not pool:
        pool = [s for s in ctx.cache.subjects if s not in ctx.subjects]
    pool = [s for s in pool if s in ctx.cache and s not in ctx.subjects]
    pool = [s for s in pool if label in ctx.cache[s].label_names]
    order = np.random.default_rng([ctx.seed, 31]).permutation(len(pool))
    return [pool[i] for i in order]


def _options(ctx: EvalContext) -> dict[str, Any]:
    o = ctx.options
    return {
        "budget": SegBudget(
            steps=int(o.get("seg_steps", 40)),
            crop=int(o.get("seg_crop", 32)),
            batch=int(o.get("seg_batch", 4)),
            lr=float(o.get("seg_lr", 1e-3)),
        ),
        "subjects": sorted({int(n) for n in o.get("seg_subjects", (1, 3))}),
        "labels": list(o.get("seg_labels", (TISSUE_LABEL,))),
        "regions": int(o.get("seg_regions", 4)),
        "atlas_label": str(o.get("region_label", DEFAULT_LABEL)),
        "full_resolution": bool(o.get("seg_full_resolution", False)),
    }


def _label_sets(ctx: EvalContext, opts: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """Label sets that can run: name -> (label map, fine-tuning subject pool)."""
    out = {}
    for name in opts["labels"]:
        lab = TISSUE_LABEL if name == TISSUE_LABEL else opts["atlas_label"]
        if not all(lab in ctx.cache[s].label_names for s in ctx.subjects):
            continue
        pool = finetune_subjects(ctx, lab)
        if pool:
            out[name] = (lab, pool)
    return out


def _applies(ctx: EvalContext) -> bool:
    return ctx.spec.spatial_dims == 3 and bool(_label_sets(ctx, _options(ctx)))


def _figure(results: dict[str, dict[str, dict[int, float]]]) -> plt.Figure:
    """Bars: mean Dice per label set, number of labelled subjects and initialisation."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.6), squeeze=False)
    for ax, (name, by_init) in zip(axes[0], results.items(), strict=True):
        counts = sorted(next(iter(by_init.values())))
        width = 0.8 / len(by_init)
        for j, (init, scores) in enumerate(by_init.items()):
            xs = np.arange(len(counts)) + (j - (len(by_init) - 1) / 2) * width
            ax.bar(xs, [scores[n] for n in counts], width, label=init)
        ax.set_xticks(np.arange(len(counts)), [f"{n} labelled" for n in counts])
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean Dice (held-out)")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _slice_figure(image: np.ndarray, panels: dict[str, np.ndarray], k: int) -> plt.Figure:
    z = image.shape[-1] // 2
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.8))
    axes[0].imshow(image[0, :, :, z].T, cmap="gray", origin="lower")
    axes[0].set_title("image", fontsize=8)
    for ax, (name, lab) in zip(axes[1:], panels.items(), strict=True):
        ax.imshow(
            lab[:, :, z].T,
            cmap="tab10",
            vmin=0,
            vmax=max(k - 1, 1),
            origin="lower",
            interpolation="nearest",
        )
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _classes(
    ctx: EvalContext, name: str, lab: str, chosen: list[str], n_regions: int
) -> tuple[dict[int, int] | None, int, list[str]] | None:
    """(label mapping, number of classes, class names) of one label set; ``None`` when an
    atlas has no region to segment."""
    if name == TISSUE_LABEL:
        subjects = [*chosen, *ctx.subjects]
        values = sorted({int(v) for s in subjects for v in np.unique(ctx.cache[s].label(lab))})
        num_classes = max(values) + 1
        return None, num_classes, _tissue_names(num_classes)
    regions = largest_regions(ctx.cache, chosen, lab, n_regions)
    if not regions:
        return None
    names = atlas_names(lab)
    class_names = ["background", *(names.get(r, str(r)) for r in regions)]
    return {r: i + 1 for i, r in enumerate(regions)}, len(regions) + 1, class_names


def _finetune_all(
    ctx: EvalContext,
    inits: dict[str, Any],
    counts: list[int],
    train_vols: list[Any],
    test_vols: list[Any],
    num_classes: int,
    opts: dict[str, Any],
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, Any]], dict[str, np.ndarray]]:
    """Fine-tune every initialisation on the first ``n`` labelled subjects for each ``n``:
    mean Dice, Dice per class, and example predictions (largest ``n``)."""
    budget: SegBudget = opts["budget"]
    truths = [v.label[0] for v in test_vols]
    res: dict[str, dict[int, float]] = {k: {} for k in inits}
    per_class: dict[str, dict[int, Any]] = {k: {} for k in inits}
    example: dict[str, np.ndarray] = {"truth": truths[0]}
    dev, prec = ctx.device, ctx.precision
    runs = [(n, init, make) for n in counts for init, make in inits.items()]
    for n, init, make in ctx.bar(runs, desc="segmentation", unit="run"):
        torch.manual_seed(ctx.seed)  # the same decoder initialisation for both
        net = PyramidUNet(make(), num_classes, opts["full_resolution"])
        finetune(net, train_vols[:n], num_classes, budget, ctx.seed, device=dev, precision=prec)
        preds = [predict(net, v.image, budget.crop, device=dev, precision=prec) for v in test_vols]
        d = dice_per_class(preds, truths, num_classes)
        res[init][n] = float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")
        per_class[init][n] = [None if not np.isfinite(x) else float(x) for x in d]
        if n == max(counts):
            example[f"{init}, {n} labelled"] = preds[0]
    return res, per_class, example


def _set_metrics(
    lab: str,
    class_names: list[str],
    chosen: list[str],
    counts: list[int],
    res: dict[str, dict[int, float]],
    per_class: dict[str, dict[int, Any]],
) -> dict[str, Any]:
    """One label set's entry of ``metrics.json``."""
    return {
        "label_map": lab,
        "classes": class_names,
        "finetune_subjects": {str(n): chosen[:n] for n in counts},
        "mean_dice": {init: {str(n): v for n, v in r.items()} for init, r in res.items()},
        "dice_per_class": {
            init: {str(n): v for n, v in r.items()} for init, r in per_class.items()
        },
    }


@register_task("segmentation", applies=_applies, default=False)  # minutes: asked for by name
def segmentation_task(ctx: EvalContext) -> TaskResult:
    """Fine-tune pretrained vs scratch U-Nets on 1 and 3 labelled subjects; Dice on held-out."""
    opts = _options(ctx)
    budget: SegBudget = opts["budget"]
    if ctx.spec.spatial_dims != 3:
        raise AnatomapError(f"{ctx.ckpt.path}: task 'segmentation' needs a 3-D encoder")
    sets = _label_sets(ctx, opts)
    if not sets:
        raise AnatomapError(
            f"{ctx.cache.root}: task 'segmentation' needs a '{TISSUE_LABEL}' or "
            f"'{opts['atlas_label']}' label map on every evaluated subject and on at least one "
            "training subject"
        )
    strides = ctx.encoder.pyramid_strides
    budget.crop = int(math.ceil(budget.crop / max(strides)) * max(strides))
    inits = {
        ctx.name: lambda: copy.deepcopy(ctx.encoder),
        "scratch": lambda: random_encoder(ctx.spec, ctx.seed),
    }
    sections_text, tables, figures = [], [], []
    metrics: dict[str, Any] = {
        "steps": budget.steps,
        "crop": budget.crop,
        "batch": budget.batch,
        "lr": budget.lr,
        "label_sets": {},
    }
    all_res: dict[str, dict[str, dict[int, float]]] = {}
    t0 = time.perf_counter()
    for name, (lab, pool) in sets.items():
        counts = [n for n in opts["subjects"] if n <= len(pool)] or [len(pool)]
        chosen = pool[: max(counts)]
        classes = _classes(ctx, name, lab, chosen, opts["regions"])
        if classes is None:
            continue
        mapping, num_classes, class_names = classes
        train_vols = load_volumes(ctx.cache, chosen, lab, mapping, budget.crop)
        test_vols = load_volumes(ctx.cache, ctx.subjects, lab, mapping, budget.crop)
        res, per_class, example = _finetune_all(
            ctx, inits, counts, train_vols, test_vols, num_classes, opts
        )
        all_res[name] = res
        header = ["initialisation", *(f"Dice, {n} labelled" for n in counts)]
        rows = [[init, *(res[init][n] for n in counts)] for init in inits]
        tables.append(
            (
                f"{name}: mean Dice over {num_classes - 1} foreground classes (best in bold)",
                header,
                rows,
                {h: "max" for h in header[1:]},
            )
        )
        figures.append(
            (
                f"{name}: middle axial slice of {ctx.subjects[0]}",
                _slice_figure(test_vols[0].image, example, num_classes),
            )
        )
        sections_text.append(
            f"<b>{name}</b> (label map '{lab}'; classes {', '.join(class_names[1:])}): "
            f"fine-tuned on {', '.join(chosen[: max(counts)])}."
        )
        metrics["label_sets"][name] = _set_metrics(lab, class_names, chosen, counts, res, per_class)
    metrics["seconds"] = time.perf_counter() - t0
    if all_res:
        figures.insert(0, ("Held-out mean Dice against labelled subjects", _figure(all_res)))
    text = (
        "A U-Net (the encoder's pyramid as down path; MONAI UnetUpBlock decoder) is "
        f"fine-tuned for {budget.steps} steps of {budget.batch} crops of {budget.crop}^3 "
        f"voxels (AdamW, lr {budget.lr:g}, MONAI DiceCELoss) from the checkpoint's encoder "
        "or from scratch, with the same crops and decoder initialisation; Dice (MONAI "
        "DiceMetric, foreground classes, classes absent from a subject skipped) on the "
        f"held-out subjects {', '.join(ctx.subjects)}. " + " ".join(sections_text)
    )
    section = Section("Label-efficient segmentation", text=text, tables=tables, figures=figures)
    return TaskResult(metrics, [section])


def _tissue_names(num_classes: int) -> list[str]:
    """The demo's tissue class names when the map has its four classes, else generic."""
    from anatomap.data.demo import TISSUE_LABELS

    if num_classes == len(TISSUE_LABELS):
        return [TISSUE_LABELS[i] for i in range(num_classes)]
    return ["background", *(f"class {i}" for i in range(1, num_classes))]
