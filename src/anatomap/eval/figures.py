"""Figures of dense embeddings for the report: PCA-to-RGB maps, similarity to a point (static
and interactive), and the helpers the evaluation tasks share.

A :class:`DenseSlice` is one axial slice of a volume with one model's unit-length features on
it (feature voxel ``(a, b)`` sits at image voxel ``(s a, s b)``, ``s`` the stride, as
:func:`anatomap.geometry.feature_affine` states). From it:

- :func:`pca_rgb`: the first three principal components of the features (scikit-learn PCA
  fitted on the slice) as red, green and blue, each stretched between its 1st and 99th
  percentile; anatomy the model tells apart gets different colours (as in SAM, Yan et al.
  2022, Fig. 4, and DINO-style feature visualisations);
- :func:`similarity_figure`: cosine similarity of every voxel to a few chosen points;
- :func:`similarity_widget`: the same for a point the reader clicks, computed in the page by
  inline JavaScript from int8-quantised features (no server, no external script).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from anatomap.eval.report import Section
from anatomap.infer.device import autocast, resolve_device, resolve_precision
from anatomap.models.encoders import Encoder
from anatomap.objectives.base import DenseObjective, Objective

if TYPE_CHECKING:
    from anatomap.eval.tasks import EvalContext

# --------------------------------------------------------------------------------------------
# Dense features of a slice
# --------------------------------------------------------------------------------------------


@dataclass
class DenseSlice:
    """An axial slice ``image [X, Y]`` and one model's features ``[D, x, y]`` on it (unit
    length along D) at ``stride`` image voxels per feature voxel."""

    name: str
    image: np.ndarray
    features: np.ndarray
    stride: int

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, np.float32)
        f = np.asarray(self.features, np.float32)
        norm = np.linalg.norm(f, axis=0, keepdims=True)
        self.features = f / np.maximum(norm, 1e-8)

    def feature_index(self, ij: Sequence[float]) -> tuple[int, int]:
        """The feature voxel nearest to image voxel ``ij``."""
        h, w = self.features.shape[1:]
        a = int(np.clip(np.rint(ij[0] / self.stride), 0, h - 1))
        b = int(np.clip(np.rint(ij[1] / self.stride), 0, w - 1))
        return a, b

    def extent(self) -> tuple[float, float, float, float]:
        """imshow extent (image voxel units) of the feature grid: voxel ``o`` centred at
        ``s o``."""
        s = self.stride
        h, w = self.features.shape[1:]
        return (-s / 2, s * h - s / 2, -s / 2, s * w - s / 2)


def _feature_level(encoder: Encoder) -> int:
    """The pyramid level shown for encoders without dense heads: the third (stride 4-8 for
    the registered encoders), or the deepest when there are fewer."""
    return min(2, len(encoder.pyramid_strides) - 1)


@torch.no_grad()
def slice_features(
    encoder: Encoder,
    objective: Objective | None,
    image: np.ndarray,
    z: int,
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> tuple[np.ndarray, int]:
    """Features ``[D, x, y]`` of axial slice ``z`` of ``image [C, X, Y, Z]`` and their stride.

    Dense objectives (:class:`~anatomap.objectives.base.DenseObjective`) give their fine map (sliding window, as ``embed``);
    other encoders the pyramid level of :func:`_feature_level`, L2-normalised. Only a slab
    of the volume around ``z`` is encoded (its thickness a multiple of the largest stride,
    ``z`` on the feature grid), so memory does not grow with the number of slices. The
    networks run on ``device`` (``precision``: its autocast, auto = bf16 on CUDA only); the
    features come back as a CPU array.
    """
    m = int(max(encoder.pyramid_strides))
    thick = max(2 * m, 32 // m * m)
    off = thick // 2 // m * m
    c, nx, ny, nz = image.shape
    slab = np.zeros((c, nx, ny, thick), np.float32)
    lo, hi = max(0, z - off), min(nz, z - off + thick)
    slab[..., lo - (z - off) : hi - (z - off)] = image[..., lo:hi]
    encoder = encoder.eval()
    dev = resolve_device(device)
    if objective is not None and isinstance(objective, DenseObjective):
        from anatomap.infer.embed import DenseModel, embed_array

        model = DenseModel(encoder, objective.eval())
        emb = embed_array(model, slab, np.eye(4), window=64, device=dev, precision=precision)
        stride = int(objective.strides[1])
        return emb.fine[:, :, :, off // stride].numpy(), stride
    pad = [(-n) % m for n in (nx, ny)]
    x = torch.from_numpy(np.pad(slab, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0))))[None]
    level = _feature_level(encoder)
    stride = int(encoder.pyramid_strides[level])
    with autocast(dev, resolve_precision(precision, dev)):
        top = encoder.to(dev).pyramid(x.to(dev))[level]
    fmap = F.normalize(top.float(), dim=1)[0].cpu()
    keep = (-(-nx // stride), -(-ny // stride))
    return fmap[:, : keep[0], : keep[1], off // stride].numpy(), stride


def foreground_slice(subject) -> int:
    """The axial index through the middle of a cached subject's foreground."""
    fg = np.asarray(subject.foreground)
    if len(fg) == 0:
        return int(subject.image.shape[-1] // 2)
    return int(np.median(fg[:, 2]))


def dense_slices(
    subject,
    models: dict[str, tuple[Encoder, Objective | None]],
    z: int | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> list[DenseSlice]:
    """One :class:`DenseSlice` per model on the same axial slice of a cached subject (run on
    ``device``, see :func:`slice_features`)."""
    image = np.asarray(subject.image, np.float32)
    z = foreground_slice(subject) if z is None else int(z)
    out = []
    for name, (enc, obj) in models.items():
        feats, stride = slice_features(enc, obj, image, z, device=device, precision=precision)
        out.append(DenseSlice(name, image[0, :, :, z], feats, stride))
    return out


# --------------------------------------------------------------------------------------------
# PCA to RGB, similarity maps
# --------------------------------------------------------------------------------------------


def pca_rgb(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[D, *s]`` features -> ``[*s, 3]`` colours in [0, 1]: the first three principal
    components, each stretched between its 1st and 99th percentile."""
    d = features.shape[0]
    flat = features.reshape(d, -1).T.astype(np.float64)
    k = min(3, d, len(flat))
    comps = PCA(n_components=k, random_state=seed).fit_transform(flat)
    rgb = np.zeros((len(flat), 3))
    for j in range(k):
        lo, hi = np.percentile(comps[:, j], [1, 99])
        rgb[:, j] = np.clip((comps[:, j] - lo) / max(hi - lo, 1e-12), 0, 1)
    return rgb.reshape(*features.shape[1:], 3)


def cosine_map(features: np.ndarray, index: tuple[int, ...]) -> np.ndarray:
    """Cosine similarity of every feature voxel to the one at ``index`` (unit features)."""
    q = features[(slice(None), *index)]
    return np.tensordot(q, features, axes=(0, 0))


def _show_image(ax, image: np.ndarray) -> None:
    vmax = max(float(np.percentile(image, 99.5)), 1e-6)
    ax.imshow(image.T, origin="lower", cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def pca_figure(slices: Sequence[DenseSlice], subject: str = "") -> Figure:
    """The slice, then each model's PCA-RGB map (PCA fitted per model)."""
    n = len(slices) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    _show_image(axes[0, 0], slices[0].image)
    axes[0, 0].set_title(f"{subject} axial slice".strip(), fontsize=9)
    for ax, sl in zip(axes[0, 1:], slices, strict=True):
        ax.imshow(
            np.transpose(pca_rgb(sl.features), (1, 0, 2)),
            origin="lower",
            extent=sl.extent(),
            interpolation="nearest",
        )
        ax.set_xlim(-0.5, sl.image.shape[0] - 0.5)
        ax.set_ylim(-0.5, sl.image.shape[1] - 0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{sl.name}\n(stride {sl.stride}, {sl.features.shape[0]}-d)", fontsize=9)
    fig.tight_layout()
    return fig


def default_points(image: np.ndarray, n: int = 3, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` image voxels spread over the bright part of a slice (reproducible)."""
    thr = np.percentile(image, 60)
    ij = np.argwhere(image >= thr)
    if len(ij) == 0:
        ij = np.argwhere(np.ones_like(image, bool))
    order = np.argsort(ij[:, 0] * image.shape[1] + ij[:, 1])
    picks = np.linspace(0, len(order) - 1, n + 2)[1:-1].round().astype(int)
    return [tuple(int(v) for v in ij[order[p]]) for p in picks]


def similarity_figure(
    slices: Sequence[DenseSlice], points: Sequence[tuple[int, int]] | None = None
) -> Figure:
    """Rows: points (image voxels); columns: models. Cosine similarity of every position to
    the point's feature, over the slice; the star marks the point."""
    points = list(points or default_points(slices[0].image))
    fig, axes = plt.subplots(
        len(points), len(slices), figsize=(3.3 * len(slices), 3.0 * len(points)), squeeze=False
    )
    for r, pt in enumerate(points):
        for c, sl in enumerate(slices):
            ax = axes[r, c]
            _show_image(ax, sl.image)
            sim = cosine_map(sl.features, sl.feature_index(pt))
            im = ax.imshow(
                sim.T,
                origin="lower",
                extent=sl.extent(),
                cmap="magma",
                vmin=-1,
                vmax=1,
                alpha=0.65,
                interpolation="bilinear",
            )
            ax.set_xlim(-0.5, sl.image.shape[0] - 0.5)
            ax.set_ylim(-0.5, sl.image.shape[1] - 0.5)
            ax.plot(pt[0], pt[1], "*", color="cyan", ms=11, mec="k")
            if r == 0:
                ax.set_title(sl.name, fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="cosine similarity")
    return fig


# --------------------------------------------------------------------------------------------
# The interactive widget (inline JavaScript, see report.WIDGET_JS)
# --------------------------------------------------------------------------------------------


def _png_data_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    plt.imsave(buf, rgb, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grey(image: np.ndarray) -> np.ndarray:
    """``[X, Y]`` -> RGB ``[rows, cols, 3]`` shown like :func:`_show_image` (x right, y up)."""
    vmax = max(float(np.percentile(image, 99.5)), 1e-6)
    g = np.clip(image / vmax, 0, 1).T[::-1]
    return np.repeat(g[..., None], 3, axis=-1)


def similarity_widget(slices: Sequence[DenseSlice], uid: str, scale: int = 0) -> str:
    """HTML of the clicked-point widget: one canvas per model over the same slice; a click on
    any of them draws every model's cosine-similarity map to the clicked position.

    The page carries each model's features as int8 (value x 127, position-major, base64) and
    the slice as a PNG; ``report.WIDGET_JS`` computes the similarities in the browser.
    """
    image = slices[0].image
    nx, ny = image.shape
    scale = scale or max(1, int(np.ceil(240 / max(nx, ny))))
    lut = (plt.get_cmap("magma")(np.linspace(0, 1, 256))[:, :3] * 255).round().astype(int)
    models = []
    for sl in slices:
        d, h, w = sl.features.shape
        q = np.clip(np.rint(sl.features * 127), -127, 127).astype(np.int8)
        q = np.ascontiguousarray(q.reshape(d, h * w).T)  # [positions, D], position a*w + b
        models.append(
            {
                "name": sl.name,
                "d": d,
                "h": h,
                "w": w,
                "stride": sl.stride,
                "data": base64.b64encode(q.tobytes()).decode(),
            }
        )
    start = default_points(image, 1)[0]
    payload = {
        "nx": nx,
        "ny": ny,
        "scale": scale,
        "lut": lut.tolist(),
        "start": list(start),
        "models": models,
    }
    blob = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    img = _png_data_uri(_grey(image))
    canvases = "".join(
        f"<div class='am-panel'><div class='am-name'>{html.escape(m['name'])}</div>"
        f"<canvas class='am-canvas' width='{nx * scale}' height='{ny * scale}' "
        f"data-model='{k}'></canvas></div>"
        for k, m in enumerate(models)
    )
    return (
        f"<div class='am-sim' id='{html.escape(uid)}'>"
        f"<img class='am-base' alt='slice' src='{img}'>"
        f"<script type='application/json' class='am-data'>{blob}</script>"
        f"<div class='am-row'>{canvases}</div>"
        "<p class='note am-status'>Click a point on any panel: every panel shows the cosine "
        "similarity of each position to the clicked one (colour: -1 dark, +1 bright).</p>"
        "<noscript><p class='note'>JavaScript is off: see the static similarity maps "
        "below.</p></noscript></div>"
    )


def embedding_section(
    subject_id: str,
    subject,
    models: dict[str, tuple[Encoder, Objective | None]],
    *,
    uid: str = "similarity",
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> Section:
    """The report section of dense embeddings on one subject: interactive similarity to a
    clicked point, static similarity maps for three points, and PCA-RGB maps (the models
    run on ``device``, see :func:`slice_features`)."""
    slices = dense_slices(subject, models, device=device, precision=precision)
    z = foreground_slice(subject)
    text = (
        f"Axial slice {z} of held-out subject {html.escape(subject_id)}. Features: the fine "
        "dense map for dense objectives, otherwise the encoder's pyramid level shown below "
        "(unit length). PCA-RGB: the first three principal components of each model's "
        "features on the slice as red, green and blue; a model that encodes position paints "
        "different anatomy in different colours and symmetric or repeated structures alike."
    )
    return Section(
        "Dense embeddings",
        text=text,
        html=[similarity_widget(slices, uid)],
        figures=[
            (
                "Cosine similarity to three fixed points (star), per model: the static "
                "version of the interactive panels",
                similarity_figure(slices),
            ),
            ("PCA of the features as RGB, per model", pca_figure(slices, subject_id)),
        ],
    )


def context_embedding_section(ctx: EvalContext) -> Section | None:
    """:func:`embedding_section` for an evaluation: the checkpoint and its random-init twin
    on the first held-out subject (``None`` when ``ctx.options["embedding_maps"]`` is
    false)."""
    if not ctx.options.get("embedding_maps", True) or not ctx.subjects:
        return None
    models = {
        ctx.name: (ctx.encoder, ctx.objective),
        "random init": (ctx.random_encoder(), ctx.random_objective()),
    }
    sid = ctx.subjects[0]
    return embedding_section(
        sid, ctx.cache[sid], models, device=ctx.device, precision=ctx.precision
    )
