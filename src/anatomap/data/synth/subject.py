"""One synthetic subject (:func:`synth_subject`) and the on-the-fly dataset of them
(:class:`SynthViewDataset`); the package docstring says what is randomised."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch.utils.data import Dataset

from anatomap import geometry
from anatomap.data.cache import MAX_FOREGROUND_POINTS, CachedSubject
from anatomap.data.phantoms import oriented_affine
from anatomap.data.sampler import ViewSpec, modality_mask, sample_seed, sample_views
from anatomap.data.synth.config import SynthConfig
from anatomap.data.synth.render import (
    Acquisition,
    Paint,
    acquire,
    add_texture,
    choose_family,
    draw_acquisition,
    draw_paint,
    paint_source,
)
from anatomap.data.synth.source import LabelSource
from anatomap.geometry.fields import (
    Diffeomorphism,
    WorldMap,
    random_velocity,
    sample,
    subdividing_grid,
)

Seed = int | Sequence[int]
Sources = LabelSource | Sequence[LabelSource] | None
_CODES = ("RL", "AP", "SI")  # world axis -> (positive, negative) orientation letter


@dataclass(frozen=True)
class Render:
    """One contrast of a subject: its family, paint and acquisition artefacts."""

    contrast: str
    paint: Paint
    acquisition: Acquisition

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Render:
        return cls(d["contrast"], Paint(**d["paint"]), Acquisition(**d["acquisition"]))


def _draw_render(rng: np.random.Generator, src: LabelSource, cfg: SynthConfig) -> Render:
    family = choose_family(rng, src, cfg.contrasts, cfg.real_fraction)
    return Render(
        family,
        draw_paint(rng, src, family, cfg),
        draw_acquisition(rng, cfg, family, cfg.spacing),
    )


@dataclass(frozen=True)
class SynthParams:
    """Everything drawn for one subject (JSON-able through :meth:`to_dict`).

    The subject -> template map is ``affine @ phi(x)``: ``phi = exp(v)`` deforms subject
    world, ``v`` rebuilt from ``velocity_seed`` on the grid ``field_affine, field_shape`` (every
    ``field_stride``-th voxel of the image grid, plus margins: the field upsamples exactly onto
    it), then the global ``affine`` maps to source world.
    """

    seed: list[int]
    source: int
    contrast: str
    rotation_deg: list[float]
    scale: list[float]
    shear: list[float]
    translation_mm: list[float]
    affine: list[list[float]]
    field_affine: list[list[float]]
    field_shape: list[int]
    field_stride: int
    svf_scales_mm: list[float]
    svf_peaks_mm: list[float]
    velocity_seed: int
    integration_steps: int
    orientation: str
    spacing: float
    shape: list[int]
    image_affine: list[list[float]]
    fov_cut_axes: list[int]
    paint: Paint
    acquisition: Acquisition
    extra_renders: list[Render] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthParams:
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        kw["paint"], kw["acquisition"] = Paint(**d["paint"]), Acquisition(**d["acquisition"])
        kw["extra_renders"] = [Render.from_dict(r) for r in d.get("extra_renders", [])]
        return cls(**kw)

    @property
    def renders(self) -> list[Render]:
        """Every contrast render of the subject (the first is ``contrast``/``paint``/...)."""
        return [Render(self.contrast, self.paint, self.acquisition), *self.extra_renders]

    def world_map(self) -> WorldMap:
        """The exact subject world -> source (template) world map."""
        return _world_map(self)


def _world_map(p: SynthParams) -> WorldMap:
    faff = np.asarray(p.field_affine, np.float64)
    phi = None
    if any(v > 0 for v in p.svf_peaks_mm):
        v = random_velocity(
            np.random.default_rng(p.velocity_seed),
            p.field_shape,
            p.spacing * p.field_stride,
            p.svf_scales_mm,
            p.svf_peaks_mm,
        )
        phi = Diffeomorphism(v, faff, p.integration_steps)
    return WorldMap(phi=phi, post=np.asarray(p.affine, np.float64))


def _global_affine(rng: np.random.Generator, cfg: SynthConfig, centre: np.ndarray) -> dict:
    rot = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, 3)
    scale = rng.uniform(*cfg.scale, 3)
    shear = rng.uniform(-cfg.shear, cfg.shear, 3)
    trans = rng.uniform(-cfg.translation_mm, cfg.translation_mm, 3)
    sh = np.array([[1.0, shear[0], shear[1]], [0.0, 1.0, shear[2]], [0.0, 0.0, 1.0]])
    lin = Rotation.from_euler("xyz", rot, degrees=True).as_matrix() @ np.diag(scale) @ sh
    a = np.eye(4)
    a[:3, :3] = lin
    a[:3, 3] = centre + trans - lin @ centre  # about the anatomy's centre
    return {
        "rotation_deg": rot.tolist(),
        "scale": scale.tolist(),
        "shear": shear.tolist(),
        "translation_mm": trans.tolist(),
        "affine": a,
    }


def _field_of_view(
    rng: np.random.Generator, cfg: SynthConfig, anatomy: np.ndarray, slack: float
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """World box (subject mm) around the anatomy plus margins; maybe cut through it."""
    lo, hi = anatomy.min(0), anatomy.max(0)
    margins = rng.uniform(*cfg.margin_mm, (2, 3))
    box_lo, box_hi = lo - slack - margins[0], hi + slack + margins[1]
    cut: list[int] = []
    if rng.random() < cfg.fov_cut_probability:
        n_cut = int(rng.integers(1, cfg.fov_max_cut_axes + 1))
        cut = sorted(int(a) for a in rng.choice(3, n_cut, replace=False))
        for ax in cut:
            keep = rng.uniform(*cfg.fov_keep) * (hi[ax] - lo[ax])
            box_lo[ax] = lo[ax] + rng.uniform() * (hi[ax] - lo[ax] - keep)
            box_hi[ax] = box_lo[ax] + keep
    return box_lo, box_hi, cut


def _orientation(rng: np.random.Generator, cfg: SynthConfig) -> str:
    if not cfg.random_orientation:
        return "RAS"
    perm, flips = rng.permutation(3), rng.random(3) < 0.5
    return "".join(_CODES[w][int(f)] for w, f in zip(perm, flips, strict=True))


def draw_params(sources: Sequence[LabelSource], cfg: SynthConfig, seed: Seed) -> SynthParams:
    """Draw one subject's parameters from ``np.random.default_rng(seed)`` (deterministic)."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(len(sources))) if len(sources) > 1 else 0
    src = sources[k]
    pts = src.anatomy_points
    lo, hi = pts.min(0), pts.max(0)
    glob = _global_affine(rng, cfg, (lo + hi) / 2.0)
    peaks = [float(rng.uniform(0.0, m)) for m in cfg.svf_max_mm]
    velocity_seed = int(rng.integers(2**62))
    inv = np.linalg.inv(glob["affine"])
    slack = sum(peaks)  # how far the deformation can move the anatomy
    box_lo, box_hi, cut = _field_of_view(rng, cfg, geometry.apply_affine(inv, pts), slack)
    codes = _orientation(rng, cfg)
    world_axis = ["RLAPSI".index(c) // 2 for c in codes]
    shape = [int(np.floor((box_hi[w] - box_lo[w]) / cfg.spacing)) + 1 for w in world_axis]
    img_affine = oriented_affine(codes, [cfg.spacing] * 3, (box_lo + box_hi) / 2.0, shape)
    stride = max(1, round(cfg.field_spacing_mm / cfg.spacing))
    while max(shape) > 160 * stride:  # keep the field grid small for large anatomies
        stride *= 2
    margin = int(np.ceil(cfg.field_margin_mm / (stride * cfg.spacing)))
    f_affine, f_shape = subdividing_grid(img_affine, shape, stride, margin)
    first = _draw_render(rng, src, cfg)
    # drawn after everything else: renders=1 draws exactly what it always drew
    extra = [_draw_render(rng, src, cfg) for _ in range(cfg.renders - 1)]
    return SynthParams(
        seed=[int(s) for s in np.atleast_1d(seed)],
        source=k,
        contrast=first.contrast,
        **{n: glob[n] for n in ("rotation_deg", "scale", "shear", "translation_mm")},
        affine=glob["affine"].tolist(),
        field_affine=f_affine.tolist(),
        field_shape=list(f_shape),
        field_stride=stride,
        svf_scales_mm=[float(s) for s in cfg.svf_scales_mm],
        svf_peaks_mm=peaks,
        velocity_seed=velocity_seed,
        integration_steps=cfg.integration_steps,
        orientation=codes,
        spacing=float(cfg.spacing),
        shape=shape,
        image_affine=img_affine.tolist(),
        fov_cut_axes=cut,
        paint=first.paint,
        acquisition=first.acquisition,
        extra_renders=extra,
    )


@dataclass(eq=False)
class SynthSubject:
    """One synthetic subject: ``image`` (float32; HU for the ``ct`` family, else [0, 1]) and
    ``labels`` (name -> int map) on the grid ``affine`` (voxel -> subject world, RAS mm),
    ``anatomy`` (bool, the source's classes > 0 there), the ``params`` drawn and the source;
    ``extra_images``: the further contrast renders of ``config.renders > 1`` (same grid).
    """

    image: np.ndarray
    affine: np.ndarray
    labels: dict[str, np.ndarray]
    anatomy: np.ndarray
    params: SynthParams
    source: LabelSource = field(repr=False)
    extra_images: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def contrast(self) -> str:
        """The contrast family used (``real``: the source's own intensities)."""
        return self.params.contrast

    @property
    def images(self) -> list[np.ndarray]:
        """Every render (``config.renders``): ``image`` first, same grid and anatomy."""
        return [self.image, *self.extra_images]

    @functools.cached_property
    def world_map(self) -> WorldMap:
        return self.params.world_map()

    def to_template(self, points_mm: np.ndarray) -> np.ndarray:
        """Subject world points ``[..., 3]`` (mm) -> source (template) world mm, exactly."""
        return self.world_map(points_mm)

    def to_subject(self, points_mm: np.ndarray) -> np.ndarray:
        """Template world points ``[..., 3]`` -> subject world mm (inverse to 1e-4 mm)."""
        return self.world_map.inverse(points_mm)

    @functools.cached_property
    def landmarks(self) -> tuple[list[str], np.ndarray]:
        """The source's landmarks inside this subject's field of view: names and subject
        world mm ``[M, 3]``."""
        src = self.source
        if not len(src.landmark_names):
            return [], np.zeros((0, 3))
        xyz = self.to_subject(src.landmark_mm)
        keep = geometry.inside(geometry.world_to_voxel(self.affine, xyz), self.image.shape)
        return [n for n, k in zip(src.landmark_names, keep, strict=True) if k], xyz[keep]


def _sources(source: Sources) -> list[LabelSource]:
    if source is None:
        return [LabelSource.brain()]
    return [source] if isinstance(source, LabelSource) else list(source)


def synth_subject(
    source: Sources = None, config: SynthConfig | None = None, seed: Seed = 0
) -> SynthSubject:
    """Draw and render one subject (deterministic from ``seed``, an int or a sequence such as
    ``[seed, index]``). ``source``: one label source, several (one is drawn per subject), or
    ``None`` for the MNI152 brain."""
    sources = _sources(source)
    cfg = config or SynthConfig()
    return render(sources, draw_params(sources, cfg, seed))


def render(sources: Sequence[LabelSource], p: SynthParams) -> SynthSubject:
    """Render the subject that ``p`` describes (the same arrays every time)."""
    src = sources[p.source]
    wm = p.world_map()
    out_affine = np.asarray(p.image_affine, np.float64)
    grid = wm.sampling_grid(out_affine, p.shape, src.affine, src.shape)
    maps, stack = src.label_volume
    sampled = sample(stack, grid, mode="nearest").round().numpy()
    on_grid = {id(a): sampled[i].astype(a.dtype) for i, a in enumerate(maps)}
    classes = on_grid[id(src.classes)]
    images = [_paint(src, grid, classes, r, p.spacing) for r in p.renders]
    subject = SynthSubject(
        image=images[0],
        affine=out_affine,
        labels={name: on_grid[id(a)] for name, a in src.labels.items()},
        anatomy=classes > 0,
        params=p,
        source=src,
        extra_images=images[1:],
    )
    subject.__dict__["world_map"] = wm  # share the integrated field
    return subject


def _paint(
    src: LabelSource, grid: torch.Tensor, classes: np.ndarray, r: Render, spacing: float
) -> np.ndarray:
    """One render's image on the subject grid (``grid``: the source sampling grid)."""
    if r.contrast == "real":
        assert src.image is not None
        image = sample(torch.from_numpy(src.image)[None], grid)[0].numpy()
    else:  # beyond the source's grid: background (air is -1000 HU, not 0)
        pad = np.float32(r.paint.means[0])
        painted = torch.from_numpy(paint_source(r.paint, src) - pad)[None]
        image = add_texture(sample(painted, grid)[0].numpy() + pad, r.paint, classes)
    return acquire(image, r.acquisition, spacing, ct=r.contrast == "ct")


def _normalise(image: np.ndarray, preset: str) -> np.ndarray:
    """The cache's intensity preset; for ``mri`` the same percentiles as MONAI's
    ``ScaleIntensityRangePercentiles`` (linear interpolation) taken with NumPy's partial sort,
    5x faster than the full sort of ``torch.quantile``."""
    from monai.transforms import ScaleIntensityRange

    from anatomap.data.preprocess import PRESETS, normalise_intensity

    p = PRESETS[preset]
    if p.kind != "mri":
        return normalise_intensity(image, p)
    lo, hi = np.percentile(image, [p.lower_percentile, p.upper_percentile])
    out = ScaleIntensityRange(float(lo), float(hi), 0.0, 1.0, clip=True)(torch.from_numpy(image))
    return np.asarray(out, dtype=np.float32)


def in_memory_subject(subject: SynthSubject, subject_id: str, preset: str) -> CachedSubject:
    """``subject`` as a cache entry would hold it: RAS voxel order, the intensity preset,
    one channel per render, foreground = the anatomy (no files; for
    :func:`~anatomap.data.sampler.sample_views`)."""
    renders = [geometry.reorient(im, subject.affine, "RAS") for im in subject.images]
    affine = renders[0][1]
    anatomy, _ = geometry.reorient(subject.anatomy, subject.affine, "RAS")
    image = np.stack([_normalise(im, preset) for im, _ in renders])
    fg = np.argwhere(anatomy).astype(np.int32)
    if len(fg) > MAX_FOREGROUND_POINTS:
        pick = np.random.default_rng(0).choice(len(fg), MAX_FOREGROUND_POINTS, replace=False)
        fg = fg[np.sort(pick)]
    meta = {"subject": subject_id, "affine": affine.tolist(), "shape": list(image.shape[1:])}
    meta |= {"present": [True] * len(image), "labels": sorted(subject.labels)}
    return CachedSubject(Path(), meta, _image=image, _foreground=fg)


class SynthViewDataset(Dataset):
    """Located views of synthetic subjects generated on the fly, in the batch-item format of
    :class:`~anatomap.data.sampler.LocatedViewDataset` (``image [V, R, *size]``, one channel
    per render, or ``[V, 1, *size]`` with ``spec.modality_per_view``; ``affine [V, 4, 4]``,
    ``modality_mask [R]``, ``subject``, ``seed``).

    Sample ``index`` renders subject ``index // reuse`` from ``[seed, index // reuse]`` (the
    subject ``write_synth_cohort(seed=seed)`` writes at that position) and cuts its views
    with a generator seeded by ``[seed, index, 1]``: the same index always gives the same
    sample, in any worker, so an interrupted run resumes exactly. ``reuse > 1`` serves
    consecutive indices (a worker's batch) from one rendered subject.
    """

    def __init__(
        self,
        source: Sources = None,
        config: SynthConfig | None = None,
        spec: ViewSpec | None = None,
        samples_per_epoch: int = 256,
        seed: int = 0,
        *,
        reuse: int = 1,
    ) -> None:
        if samples_per_epoch < 1 or reuse < 1:
            raise ValueError("samples_per_epoch and reuse must be positive")
        self.sources = _sources(source)
        self.config = config or SynthConfig()
        self.spec = spec or ViewSpec()
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.reuse = reuse
        self._last: tuple[int, CachedSubject] | None = None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}

    def subject(self, index: int) -> SynthSubject:
        """The synthetic subject behind sample ``index``."""
        return synth_subject(self.sources, self.config, [self.seed, int(index) // self.reuse])

    def cached_subject(self, index: int) -> CachedSubject:
        """Sample ``index``'s subject as an in-memory cache entry (the last one is kept)."""
        k = int(index) // self.reuse
        if self._last is None or self._last[0] != k:
            sub = self.subject(index)
            self._last = (k, in_memory_subject(sub, f"synth-{k:08d}", self.config.preset))
        return self._last[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        subject = self.cached_subject(index)
        rng = np.random.default_rng([self.seed, int(index), 1])
        images, affines = sample_views(subject, self.spec, rng)
        return {
            "image": torch.from_numpy(images),
            "affine": torch.from_numpy(affines),
            "modality_mask": torch.from_numpy(modality_mask(subject, self.spec)),
            "subject": subject.id,
            "seed": torch.tensor(
                sample_seed(self.seed, *divmod(int(index), self.samples_per_epoch))
            ),
        }
