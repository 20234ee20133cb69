"""The Python API: one function per CLI command, usable from a notebook.

>>> import anatomap as am
>>> result = am.index("scans/")                     # anatomap data index
>>> am.write_manifest(result, "manifest.jsonl")
>>> am.cache("manifest.jsonl", "cache/", preset="mri", spacing=1.5)   # anatomap data cache
>>> cfg = am.load_config("isimed", ["data.cache=cache/", "output=runs/isimed"])
>>> run = am.pretrain(cfg)                           # anatomap pretrain
>>> am.evaluate(run.run_dir).metrics                 # anatomap evaluate
>>> am.embed("runs/sam", ["a.nii.gz"], out="emb/")   # anatomap embed
>>> am.match("runs/sam", "a.nii.gz", "points.csv", ["b.nii.gz"]).to_csv("m.csv")  # match
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, overload

import numpy as np
from tqdm.auto import tqdm

from anatomap import geometry
from anatomap.config import RunConfig, config_path
from anatomap.config import load_config as _load_config
from anatomap.data.cache import Cache, CacheBuildResult, build_cache
from anatomap.data.manifest import IndexResult, index_directory
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError
from anatomap.eval.evaluate import EvalResult
from anatomap.eval.evaluate import evaluate as _evaluate
from anatomap.infer.calibration import probability
from anatomap.infer.consistency import affine_consistency
from anatomap.infer.embed import (
    EMBEDDING_SUFFIX,
    DenseEmbedding,
    DenseModel,
    check_options,
    embed_array,
    embedding_names,
    input_channels,
    load_or_embed,
    preprocess_for,
    resolve_device,
)
from anatomap.infer.match import DEFAULT_LOW_SCORE, match_points, read_points
from anatomap.infer.matches import Grid, Matches
from anatomap.train.pretrain import PretrainResult
from anatomap.train.pretrain import pretrain as _pretrain

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

Scan: TypeAlias = "str | os.PathLike[str] | SpatialImage | tuple[np.ndarray, np.ndarray]"
"""A scan: a file path (any supported format, or a DICOM folder; a saved ``.emb.safetensors``
too), a nibabel image, or an ``(array [X, Y, Z], affine 4x4 RAS+ mm)`` pair."""


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML config (file or packaged name) with ``key=value`` overrides.

    ``config_path`` (re-exported here) resolves packaged names; the validation, the method's
    own parameters included, happens once, in :func:`anatomap.config.load_config`.
    """
    return _load_config(config_path(name_or_path), overrides)


def index(root: str | Path, **kwargs) -> IndexResult:
    """Find and validate every scan under ``root`` (see :func:`index_directory`)."""
    return index_directory(root, **kwargs)


def cache(manifest, out: str | Path, **kwargs) -> CacheBuildResult:
    """Preprocess a manifest into a memory-mapped cache (see :func:`build_cache`)."""
    return build_cache(manifest, out, **kwargs)


def pretrain(cfg: RunConfig | str | Path, **kwargs) -> PretrainResult:
    """Train a config (object, file or packaged name)."""
    if not isinstance(cfg, RunConfig):
        path = config_path(cfg)
        kwargs.setdefault("config_dir", path.parent)
        cfg = _load_config(path)
    return _pretrain(cfg, **kwargs)


def evaluate(run_or_checkpoint: str | Path, **kwargs) -> EvalResult:
    """Evaluate a run folder or checkpoint (see :func:`anatomap.eval.evaluate.evaluate`)."""
    return _evaluate(run_or_checkpoint, **kwargs)


def open_cache(path: str | Path) -> Cache:
    return Cache(path)


# -- inference: anatomap embed / anatomap match ------------------------------------------


def _model(checkpoint: str | Path | DenseModel) -> DenseModel:
    return (
        checkpoint if isinstance(checkpoint, DenseModel) else DenseModel.from_checkpoint(checkpoint)
    )


def _is_path(x: Any) -> bool:
    return isinstance(x, str | os.PathLike)


def _is_one(x: Any) -> bool:
    """Whether ``x`` is one scan (not a list of them): a path, an embedding, a nibabel image,
    or an ``(array, affine)`` pair (a 2-tuple whose second item is a matrix)."""
    if _is_path(x) or isinstance(x, DenseEmbedding) or hasattr(x, "dataobj"):
        return True
    return isinstance(x, tuple) and len(x) == 2 and not _is_path(x[0]) and np.ndim(x[1]) == 2


def _many(x: Any, what: str) -> list[Any]:
    items = [x] if _is_one(x) else list(x)
    if not items:
        raise AnatomapError(f"no {what} given")
    return items


def _volume(scan: Any, label: str, modality: str) -> Volume:
    """A validated :class:`Volume` of a nibabel image or an ``(array, affine)`` pair, checked
    as a file is (:func:`anatomap.io.read_volume`): 3-D, finite, a regular affine."""
    from anatomap.io.readers import _check_geometry, _convert, _select_dims

    if hasattr(scan, "dataobj"):
        array, affine = np.asanyarray(scan.dataobj), scan.affine
    else:
        array, affine = np.asarray(scan[0]), scan[1]
    affine = np.asarray(affine if affine is not None else np.full((4, 4), np.nan), np.float64)
    if affine.shape != (4, 4):
        raise AnatomapError(f"{label}: the affine must be 4x4, not {list(affine.shape)}")
    array = _select_dims(Path(label), array, 3, None)
    _check_geometry(Path(label), affine, 3)
    array = _convert(Path(label), array, np.dtype(np.float32), True)
    return Volume(array, affine, modality=modality, path=label)


def _label(scan: Any, n: int) -> str:
    """How a scan is named in results and file names: its path, else ``image<n>``."""
    if _is_path(scan):
        return str(scan)
    if isinstance(scan, DenseEmbedding):
        return scan.source or f"image{n}"
    name = scan.get_filename() if hasattr(scan, "get_filename") else None
    return str(name) if name else f"image{n}"


def _options(**options: Any) -> dict[str, Any]:
    """The embedding options, checked before anything is read: one line naming a bad one (a
    device this machine lacks too)."""
    check_options(**options)
    return options


def _embedding(
    model: DenseModel, scan: Any, n: int, modality: str | None, options: dict[str, Any]
) -> tuple[DenseEmbedding, Grid | None]:
    """The embedding of one scan, and the grid of an in-memory one (its array's own)."""
    if isinstance(scan, DenseEmbedding):
        return scan, None
    if _is_path(scan):
        extra = {} if modality is None else {"modality": modality}
        return load_or_embed(model, scan, **options, **extra), None
    modalities = model.meta.get("data", {}).get("modalities") or ["image"]
    vol = _volume(scan, _label(scan, n), modality or modalities[0])
    pre = preprocess_for(model, vol)
    image = np.zeros((input_channels(model), *pre.shape), np.float32)
    image[0] = pre.array  # one scan -> the first modality; the others stay zeros
    emb = embed_array(model, image, pre.affine, **options)
    emb.source = str(scan.get_filename() or "") if hasattr(scan, "get_filename") else ""
    return emb, (vol.affine, vol.shape)


def _file_grid(scan: Any, emb: DenseEmbedding) -> Grid | None:
    """The grid a target's voxel indices refer to: a scan file's own; for an embedding, the
    preprocessed grid it was made on (``image_affine``; None when unknown)."""
    if _is_path(scan) and not str(scan).endswith(EMBEDDING_SUFFIX) and Path(scan).exists():
        from anatomap.io import read_volume

        vol = read_volume(scan)
        return vol.affine, vol.shape
    if emb.image_affine is None or not emb.image_shape:
        return None
    return np.asarray(emb.image_affine, np.float64), tuple(emb.image_shape)


@overload
def embed(
    model: str | Path | DenseModel, scans: Scan, out: str | Path | None = ..., **kw: Any
) -> DenseEmbedding: ...
@overload
def embed(
    model: str | Path | DenseModel, scans: Sequence[Scan], out: str | Path | None = ..., **kw: Any
) -> list[DenseEmbedding]: ...
def embed(
    model: str | Path | DenseModel,
    scans: Scan | Sequence[Scan],
    out: str | Path | None = None,
    *,
    window: int = 64,
    overlap: float = 0.25,
    batch_size: int = 2,
    device: str = "auto",
    precision: str = "auto",
    channels_last: bool = False,
    compile: bool = False,
    modality: str | None = None,
    progress: bool = False,
) -> DenseEmbedding | list[DenseEmbedding]:
    """Dense coarse and fine embeddings of whole scans (``anatomap embed``).

    Each scan gets the checkpoint's recorded preprocessing (RAS+, spacing, intensity preset),
    then a sliding window tiles it; overlaps are blended with Gaussian weights.

    Args:
        model: a dense checkpoint (run or checkpoint folder, ``meta.json``, a shipped name
            such as ``brain-mri``) or a loaded :class:`~anatomap.infer.embed.DenseModel`.
        scans: one scan or a list: file paths (a saved ``.emb.safetensors`` is read back),
            nibabel images, or ``(array [X, Y, Z], affine 4x4 RAS+ mm)`` pairs.
        out: folder to save ``<name>.emb.safetensors`` in (names that cannot collide:
            :func:`~anatomap.infer.embed.embedding_names`; in-memory scans are ``image<n>``);
            ``None`` saves nothing.
        window: sliding-window edge in voxels (rounded down to the largest stride).
        overlap: window overlap in [0, 1).
        batch_size: windows per forward pass.
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"``, ``"bf16"``,
            ``"fp16"``.
        channels_last: channels-last memory format for the convolutions.
        compile: ``torch.compile`` the network first (pays off on many or large scans).
        modality: the checkpoint modality the scans are (default: its first).
        progress: tqdm bars on stderr.

    Returns:
        One :class:`~anatomap.infer.embed.DenseEmbedding` for one scan, a list for a list.

    Raises:
        AnatomapError: a bad option or device, a scan that cannot be read (naming it), a
            checkpoint without dense output.

    Example::

        >>> emb = anatomap.embed("brain-mri", "a.nii.gz", device="cpu")
        >>> embs = anatomap.embed("brain-mri", [nib.load("b.nii.gz"), (arr, affine)])
    """
    opts = _options(
        window=window, overlap=overlap, batch_size=batch_size, device=device,
        precision=precision, channels_last=channels_last, compile=compile, progress=progress,
    )  # fmt: skip
    items = _many(scans, "scans")
    dense = _model(model)
    names = embedding_names([_label(s, n) for n, s in enumerate(items)])
    result = []
    bar = tqdm(items, desc="embed", unit="scan", disable=not progress or len(items) < 2)
    for n, (scan, name) in enumerate(zip(bar, names, strict=True)):
        emb = _embedding(dense, scan, n, modality, opts)[0]
        if out is not None:
            emb.save(Path(out) / name)
        result.append(emb)
    return result[0] if _is_one(scans) else result


def _points(
    points: str | Path | np.ndarray, voxel: bool, coords: str, names: Sequence[str] | None
) -> tuple[list[str], np.ndarray]:
    from anatomap.infer.points import to_ras

    if _is_path(points):
        return read_points(points, voxel=voxel, coords=coords)
    xyz = np.asarray(points, np.float64).reshape(-1, 3)
    xyz = xyz if voxel else to_ras(xyz, coords)
    names = list(names) if names is not None else [f"p{i}" for i in range(len(xyz))]
    if len(names) != len(xyz):
        raise AnatomapError(f"{len(names)} names for {len(xyz)} points")
    return names, xyz


def _template_world(
    template: Any, emb: DenseEmbedding, grid: Grid | None, ijk: np.ndarray
) -> np.ndarray:
    """Voxel indices of the template scan -> world mm, through the scan's own affine (an
    in-memory scan's, the file's, an embedding's source file's, else its ``image_affine``)."""
    from anatomap.io import read_volume

    scan = template if _is_path(template) else None
    if scan is None or str(scan).endswith(EMBEDDING_SUFFIX):
        scan = emb.source or None  # an embedding: the scan it was made from
    if grid is not None:
        affine = grid[0]
    elif scan is not None and not str(scan).endswith(EMBEDDING_SUFFIX) and Path(scan).exists():
        affine = read_volume(scan).affine
    elif emb.image_affine is not None:
        affine = emb.image_affine  # the preprocessed grid the embedding was made on
    else:
        raise AnatomapError(f"{_label(template, 0)}: cannot convert voxel indices (no affine)")
    return geometry.voxel_to_world(affine, ijk)


def _match_all(
    model: DenseModel,
    template: DenseEmbedding,
    names: list[str],
    world: np.ndarray,
    targets: list[Any],
    modality: str | None,
    low_score: float,
    opts: dict[str, Any],
    keep: list[DenseEmbedding] | None = None,
) -> Matches:
    """Match the template's world points in every target (a tqdm bar over the targets);
    the targets' embeddings are appended to ``keep`` when it is given."""
    device = resolve_device(opts["device"])
    found, grids = [], []
    bar = tqdm(targets, desc="match", unit="target", disable=not opts["progress"])
    for n, target in enumerate(bar):
        emb, grid = _embedding(model, target, n, modality, opts)
        found.append(match_points(template, world, emb, device=device, subvoxel=True))
        grids.append(grid or _file_grid(target, emb))
        if keep is not None:
            keep.append(emb)
    scores = np.stack([r.scores for r in found])
    calibration = model.ckpt.meta.get("calibration") if model.ckpt is not None else None
    prob = probability(calibration, scores) if calibration else None
    labels = [_label(t, n) for n, t in enumerate(targets)]
    # a robust affine over a target's matches (8 points or more) flags gross failures
    checks = [affine_consistency(world, r.points_mm, r.scores) for r in found]
    consistent = np.stack(
        [np.full(len(world), np.nan) if c.inliers is None else c.inliers * 1.0 for c in checks]
    )
    return Matches.build(names, world, labels, found, grids, prob, low_score, consistent)


def match(
    model: str | Path | DenseModel,
    template: Scan | DenseEmbedding,
    points: str | Path | np.ndarray,
    targets: Scan | DenseEmbedding | Sequence[Scan | DenseEmbedding],
    *,
    voxel: bool = False,
    names: Sequence[str] | None = None,
    coords: str = "RAS",
    low_score: float = DEFAULT_LOW_SCORE,
    window: int = 64,
    overlap: float = 0.25,
    batch_size: int = 2,
    device: str = "auto",
    precision: str = "auto",
    channels_last: bool = False,
    compile: bool = False,
    modality: str | None = None,
    progress: bool = False,
    out: str | Path | None = None,
    keep_embeddings: bool = False,
) -> Matches:
    """Find template points in target scans (``anatomap match``; SAM, Yan et al. 2022):
    coarse, then fine, then sub-voxel peak; 8+ points: a robust affine flags gross failures.

    Args:
        model: a dense checkpoint or a loaded ``DenseModel`` (as for :func:`embed`).
        template: the scan holding the points: as for :func:`embed`, or a ``DenseEmbedding``.
        points: a points file (CSV, 3D Slicer ``.mrk.json`` / ``.fcsv``) or an ``[N, 3]`` array.
        targets: one target or a list; each as ``template``.
        voxel: the points are voxel indices ``i, j, k`` of the template scan, not world mm.
        names: the names of an array's points (default ``p0, p1, ...``).
        coords: ``"RAS"`` or ``"LPS"``: the frame of a CSV's or an array's world mm.
        low_score: flag scores below this (a calibrated model flags P(within 5 mm) < 0.5).
        window: sliding-window edge in voxels, as for :func:`embed`.
        overlap: window overlap in [0, 1).
        batch_size: windows per forward pass.
        device: as for :func:`embed` (``"auto"``: a GPU when there is one); the matching
            runs there too.
        precision: as for :func:`embed` (``"auto"``: bf16 autocast on CUDA).
        channels_last: channels-last memory format for the convolutions.
        compile: ``torch.compile`` the network first.
        modality: the checkpoint modality the scans are (default: its first).
        progress: tqdm bars on stderr (targets, and windows within a scan).
        out: also save the table there (:meth:`Matches.save`: CSV + ``.json``, or Slicer
            markups for a name ending ``.mrk.json``).
        keep_embeddings: keep the embeddings in ``Matches.embeddings`` (for the viewer).

    Returns:
        :class:`~anatomap.infer.matches.Matches`: per target the matched RAS mm, voxel indices
        of the target's own grid, scores, low-confidence flags and, for a calibrated
        (shipped) model, P(within 5 mm); ``.rows()``, ``.to_csv()``, ``.to_slicer()``,
        ``.to_spheres()``, ``.to_dataframe()``.

    Raises:
        AnatomapError: a bad option or device, an unreadable scan or points file (naming
            it), points outside the template, an embedding made with another checkpoint.

    Example::

        >>> m = anatomap.match("brain-mri", "a.nii.gz", "points.csv", ["b.nii.gz"])
        >>> m.points_mm.shape, m.p_within_5mm.mean()
        >>> m.to_csv("matches.csv"); m.to_spheres("spheres.nii.gz")
    """
    opts = _options(
        window=window, overlap=overlap, batch_size=batch_size, device=device,
        precision=precision, channels_last=channels_last, compile=compile, progress=progress,
    )  # fmt: skip
    items = _many(targets, "targets")
    names, coords_in = _points(points, voxel, coords, names)
    dense = _model(model)
    t_emb, t_grid = _embedding(dense, template, 0, modality, opts)
    world = _template_world(template, t_emb, t_grid, coords_in) if voxel else coords_in
    kept: list[DenseEmbedding] | None = [] if keep_embeddings else None
    result = _match_all(dense, t_emb, names, world, items, modality, low_score, opts, kept)
    if kept is not None:
        result.embeddings = (t_emb, kept)
    if out is not None:
        result.save(out)
    return result
