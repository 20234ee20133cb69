"""Embedding after issue 18: streamed windows, float16 maps, device / precision options.

``_reference_embed_array`` is ``embed_array`` as it was before: every window's maps blended
into two full-size float32 accumulators, normalised at the end. The streamed version blends
the same windows with the same Gaussian weights in the same order, so the two agree up to
the float16 rounding of the stored maps (cosine > 0.9999 per voxel; 0.999 is required).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from anatomap import geometry
from anatomap.errors import AnatomapError
from anatomap.infer.device import float32_rows, resolve_precision
from anatomap.infer.embed import (
    DenseEmbedding,
    DenseModel,
    check_options,
    embed_array,
    embed_file,
    input_channels,
    resolve_device,
)
from anatomap.infer.match import _fine_dots, _gathered_dots, match_points, prepare_target
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config

# -- the implementation before issue 18 --------------------------------------------------------


def _starts(n: int, window: int, step: int) -> list[int]:
    if n <= window:
        return [0]
    return [i * step for i in range(math.ceil((n - window) / step) + 1)]


def _gaussian(size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return torch.exp(-0.5 * (x / max(size / 4, 1.0)) ** 2)


@torch.no_grad()
def _reference_embed_array(
    model: Any, image: np.ndarray, window: int = 64, overlap: float = 0.25, batch_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse and fine float32 maps of the old hand-rolled sliding window."""
    m = model.max_stride
    window = max(m, (window // m) * m)
    step = max(m, int(window * (1 - overlap)) // m * m)
    shape = image.shape[1:]
    starts = [_starts(n, window, step) for n in shape]
    padded = [max(window, s[-1] + window) for s in starts]
    vol = torch.zeros((image.shape[0], *padded), dtype=torch.float32)
    vol[:, : shape[0], : shape[1], : shape[2]] = torch.from_numpy(np.asarray(image, np.float32))
    outs: dict[int, list[torch.Tensor]] = {}
    boxes = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        x = torch.stack(
            [vol[:, a : a + window, b : b + window, c : c + window] for a, b, c in chunk]
        )
        for level, (stride, fmap) in enumerate(zip(model.strides, model(x), strict=True)):
            fmap, ws = fmap.float(), fmap.shape[2:]
            if level not in outs:
                size = [p // stride for p in padded]
                g = [_gaussian(n) for n in ws]
                weight = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
                outs[level] = [torch.zeros(fmap.shape[1], *size), torch.zeros(*size), weight]
            acc, wsum, weight = outs[level]
            for (a, b, c), f in zip(chunk, fmap, strict=True):
                o = (a // stride, b // stride, c // stride)
                sl = tuple(slice(o[k], o[k] + ws[k]) for k in range(3))
                acc[(slice(None), *sl)] += f * weight
                wsum[sl] += weight
    result = []
    for level, stride in enumerate(model.strides):
        acc, wsum, _ = outs[level]
        keep = [math.ceil(n / stride) for n in shape]
        emb = acc[:, : keep[0], : keep[1], : keep[2]] / wsum[: keep[0], : keep[1], : keep[2]]
        result.append(F.normalize(emb, dim=0))
    return result[0], result[1]


# -- a tiny dense model ------------------------------------------------------------------------


def _model(in_channels: int = 1, seed: int = 0) -> DenseModel:
    """small_cnn (strides 2, 4, 8) with SAM heads: coarse at stride 8, fine at stride 2."""
    torch.manual_seed(seed)
    enc = build_encoder(EncoderSpec("small_cnn", 3, in_channels, 16, {"channels": [4, 8, 16]}))
    cfg = objective_config({"name": "sam", "embed_dim": 8, "fpn_channels": 8})
    return DenseModel(enc, get_objective("sam")(cfg, enc))


def _image(shape: tuple[int, ...] = (40, 36, 30), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(1, *shape)).astype(np.float32)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=0)


OPTS = {"window": 16, "overlap": 0.5, "device": "cpu"}  # 4 x 4 x 3 windows, rings that wrap


# -- equivalence with the old sliding window ---------------------------------------------------


@pytest.mark.parametrize("batch_size", [2, 5])  # 5: batches that straddle first-axis rows
def test_streamed_windows_equal_the_reference(batch_size: int) -> None:
    model, image = _model(), _image()
    ref_c, ref_f = _reference_embed_array(model, image, 16, 0.5, batch_size)
    emb = embed_array(model, image, np.eye(4), **{**OPTS, "batch_size": batch_size})
    assert emb.coarse.shape == ref_c.shape == (8, 5, 5, 4)
    assert emb.fine.shape == ref_f.shape == (8, 20, 18, 15)
    for new, ref in ((emb.coarse, ref_c), (emb.fine, ref_f)):
        assert _cosine(new, ref).min() > 0.9999  # float16 rounding only
        assert (new.float() - ref).abs().max() <= 2**-10
    assert np.allclose(emb.fine_affine, geometry.feature_affine(np.eye(4), 2))


def test_one_window_and_large_overlap_equal_the_reference() -> None:
    model, image = _model(), _image((20, 12, 9))  # smaller than one window on every axis
    for window, overlap in ((64, 0.0), (16, 0.9)):
        ref_c, ref_f = _reference_embed_array(model, image, window, overlap)
        emb = embed_array(model, image, np.eye(4), window=window, overlap=overlap, device="cpu")
        assert _cosine(emb.fine, ref_f).min() > 0.9999
        assert _cosine(emb.coarse, ref_c).min() > 0.9999


class _LargestAllocation(TorchDispatchMode):
    """The largest block of memory (bytes) a torch operation allocates."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        held = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_leaves(out):
            strided = isinstance(t, torch.Tensor) and t.layout == torch.strided
            if strided and t.untyped_storage().data_ptr() not in held:
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


def test_memory_holds_the_float16_maps_and_one_band_not_float32_maps() -> None:
    model, image = _model(), _image((160, 24, 24))  # long along the streamed axis
    with _LargestAllocation() as mode:
        emb = embed_array(model, image, np.eye(4), **OPTS)
    full_f32 = emb.fine.numel() * 4  # what the old accumulator alone took
    assert mode.nbytes <= emb.fine.numel() * 2  # the float16 map is the largest block
    assert mode.nbytes < full_f32 / 1.9


# -- float16 storage ---------------------------------------------------------------------------


def test_maps_are_float16_voxel_major_and_editable(tmp_path: Path) -> None:
    emb = embed_array(_model(), _image(), np.eye(4), **OPTS)
    for fmap in (emb.coarse, emb.fine):
        assert fmap.dtype == torch.float16 and fmap.device.type == "cpu"
        assert fmap.stride(0) == 1  # each voxel's vector stored together
        assert not fmap.is_inference()  # made under inference_mode, yet a normal tensor
    emb.fine.mul_(1.0)  # in-place edits outside inference mode work
    back = DenseEmbedding.load(emb.save(tmp_path / "a.emb.safetensors"))
    assert back.fine.dtype == back.coarse.dtype == torch.float16 and back.fine.stride(0) == 1
    assert torch.equal(back.fine, emb.fine) and torch.equal(back.coarse, emb.coarse)
    assert np.array_equal(back.fine_affine, emb.fine_affine)


@pytest.mark.parametrize("fine_key", ["fine", "fine_voxel_major"])
def test_float32_files_of_older_versions_still_load(tmp_path: Path, fine_key: str) -> None:
    g = torch.Generator().manual_seed(0)
    coarse = F.normalize(torch.randn(8, 3, 4, 3, generator=g), dim=0)
    fine = F.normalize(torch.randn(8, 12, 16, 12, generator=g), dim=0)
    info = {
        "coarse_affine": geometry.feature_affine(np.eye(4), 8).tolist(),
        "fine_affine": geometry.feature_affine(np.eye(4), 2).tolist(),
        "source": "old.nii.gz",
        "image_shape": [24, 32, 24],
        "image_affine": np.eye(4).tolist(),
        "meta": {},
    }
    stored = fine if fine_key == "fine" else fine.movedim(0, -1).contiguous()
    path = tmp_path / "old.emb.safetensors"
    save_file({"coarse": coarse, fine_key: stored}, str(path), {"anatomap": json.dumps(info)})
    emb = DenseEmbedding.load(path)
    assert emb.fine.dtype == torch.float16 and emb.fine.shape == fine.shape
    assert torch.equal(emb.fine, fine.half()) and torch.equal(emb.coarse, coarse.half())
    res = match_points(emb, np.array([[10.0, 12.0, 9.0]]), emb)
    np.testing.assert_allclose(res.points_mm, [[10.0, 12.0, 9.0]], atol=2.0)


def test_matching_reads_float16_maps_as_it_read_float32_ones() -> None:
    model = _model()
    template = embed_array(model, _image(seed=0), np.eye(4), **OPTS)
    moved = np.eye(4)
    moved[:3, 3] = [4.0, -2.0, 2.0]
    target = embed_array(model, _image(seed=0), moved, **OPTS)
    as_f32 = [
        DenseEmbedding(e.coarse.float(), e.fine.float(), e.coarse_affine, e.fine_affine)
        for e in (template, target)
    ]
    pts = geometry.voxel_to_world(np.eye(4), np.random.default_rng(1).uniform(6, 24, (40, 3)))
    half, full = match_points(template, pts, target), match_points(*as_f32[:1], pts, as_f32[1])
    np.testing.assert_array_equal(half.points_mm, full.points_mm)
    np.testing.assert_allclose(half.scores, full.scores, atol=1e-6)
    assert prepare_target(target).rows.dtype == torch.float32


def test_float32_rows_are_upcast_in_slabs() -> None:
    fmap = F.normalize(torch.randn(8, 7, 5, 6), dim=0).half()  # channel-first: not a view
    whole = fmap.float().permute(1, 2, 3, 0).reshape(-1, 8)
    for chunk in (1, 4 * 8 * 30 * 2, 1 << 30):  # one slab of the first axis, two, all
        assert torch.equal(float32_rows(fmap, torch.device("cpu"), chunk), whole)


def test_gathered_dot_products_equal_the_sampled_ones() -> None:
    g = torch.Generator().manual_seed(0)
    rows, q = torch.randn(500, 16, generator=g), torch.randn(6, 16, generator=g)
    flat = torch.randint(0, 500, (6, 40), generator=g)
    torch.testing.assert_close(_gathered_dots(rows, q, flat), _fine_dots(rows, q, flat))


# -- options: device, precision, memory format, compile, progress ------------------------------

no_gpu = pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is present"
)


@no_gpu
def test_auto_device_is_the_cpu_here() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert check_options().device == torch.device("cpu")
    assert check_options().precision is None  # auto: fp32 off CUDA


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_a_missing_gpu_is_one_clear_error(name: str) -> None:
    with pytest.raises(AnatomapError, match="not available here") as err:
        resolve_device(name)
    assert "\n" not in str(err.value) and name in str(err.value)
    with pytest.raises(AnatomapError, match="not available"):
        match_points(*_pair(), device=name)


def _pair() -> tuple[DenseEmbedding, np.ndarray, DenseEmbedding]:
    emb = embed_array(_model(), _image((24, 24, 24)), np.eye(4), **OPTS)
    return emb, np.array([[10.0, 10.0, 10.0]]), emb


@pytest.mark.parametrize("name", ["tpu", "", "cuda:x", "gpu", None, 0])
def test_unknown_devices_are_refused_naming_the_option(name: object) -> None:
    with pytest.raises(AnatomapError, match=r"^device .*: must be auto, cpu, cuda"):
        resolve_device(name)  # type: ignore[arg-type]
    with pytest.raises(AnatomapError, match=r"^device"):
        check_options(device=name)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("precision", "fp64"),
        ("precision", None),
        ("channels_last", "yes"),
        ("compile", 1),
        ("progress", None),
        ("window", 0),
        ("batch_size", 1.5),
        ("overlap", 1.0),
    ],
)
def test_bad_options_are_one_line_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(AnatomapError, match=f"^{option} ") as err:
        check_options(**{option: value})
    assert "\n" not in str(err.value)


def test_precision_names() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp16", cpu) == torch.float16
    opts = check_options(device="cpu", precision="bf16", channels_last=True, progress=True)
    assert (opts.precision, opts.channels_last, opts.progress) == (torch.bfloat16, True, True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_stays_close_to_fp32(precision: str) -> None:
    model, image = _model(), _image()
    fp32 = embed_array(model, image, np.eye(4), **OPTS)
    mixed = embed_array(model, image, np.eye(4), **OPTS, precision=precision)
    assert mixed.fine.dtype == torch.float16  # stored the same way
    for a, b in ((fp32.fine, mixed.fine), (fp32.coarse, mixed.coarse)):
        cos = _cosine(a, b)
        assert cos.mean() > 0.999 and cos.min() > 0.98  # bf16 keeps 8 bits of mantissa


def test_channels_last_gives_the_same_maps() -> None:
    model, image = _model(), _image()
    plain = embed_array(model, image, np.eye(4), **OPTS)
    cl = embed_array(model, image, np.eye(4), **OPTS, channels_last=True)
    conv = next(p for p in model.encoder.parameters() if p.ndim == 5)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    for a, b in ((plain.fine, cl.fine), (plain.coarse, cl.coarse)):
        assert (a.float() - b.float()).abs().max() <= 2**-10  # at most float16 rounding apart
    again = embed_array(model, image, np.eye(4), **OPTS)  # and back to the default layout
    assert torch.equal(again.fine, plain.fine)


def test_compile_wraps_the_model_once_and_pads_the_last_batch(monkeypatch) -> None:
    calls: list[int] = []
    seen: list[int] = []

    def fake_compile(fn, **kwargs):
        calls.append(1)
        assert kwargs.get("dynamic") is False

        def run(x):
            seen.append(len(x))
            return fn(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, image = _model(), _image()  # 48 windows: batches of 5, the last one of 3
    plain = embed_array(model, image, np.eye(4), **OPTS, batch_size=5)
    for _ in range(2):
        compiled = embed_array(model, image, np.eye(4), **OPTS, batch_size=5, compile=True)
        assert torch.equal(compiled.fine, plain.fine) and torch.equal(compiled.coarse, plain.coarse)
    assert len(calls) == 1 and set(seen) == {5}


@pytest.mark.skipif(
    not os.environ.get("ANATOMAP_TEST_COMPILE"),
    reason="torch.compile (inductor) of this tiny CNN takes 18-36 s on 2 CPU cores (torch 2.13, "
    "measured); set ANATOMAP_TEST_COMPILE=1 to run it",
)
def test_torch_compile_gives_the_same_maps() -> None:
    model, image = _model(), _image((24, 24, 16))
    plain = embed_array(model, image, np.eye(4), **OPTS)
    compiled = embed_array(model, image, np.eye(4), **OPTS, compile=True)
    assert _cosine(compiled.fine, plain.fine).min() > 0.9999


def test_progress_bar_counts_windows_on_stderr(capsys) -> None:
    embed_array(_model(), _image(), np.eye(4), **OPTS, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "windows" in err and "48/48" in err
    embed_array(_model(), _image(), np.eye(4), **OPTS)
    assert capsys.readouterr().err == ""


# -- embed_file ------------------------------------------------------------------------------


class _TwoModalityCache(DenseModel):
    """A model trained one modality per view (``in_channels`` 1) on a two-modality cache."""

    @property
    def meta(self) -> dict[str, Any]:
        return {"data": {"modalities": ["t1", "t2"]}}


def test_embed_file_feeds_the_encoders_input_channels(tmp_path: Path) -> None:
    base = _model(in_channels=1)
    model = _TwoModalityCache(base.encoder, base.objective)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_image((24, 20, 16))[0], np.eye(4)), str(path))
    assert input_channels(model) == 1  # not 2, the cache's modalities
    emb = embed_file(model, path, window=16, device="cpu")
    assert emb.fine.shape == (8, 12, 10, 8) and emb.source == str(path)
    with pytest.raises(AnatomapError, match="image has 2 channel"):
        embed_array(model, np.zeros((2, 16, 16, 16), np.float32), np.eye(4), device="cpu")


def test_matching_runs_on_half_the_cpu_threads_and_restores_the_count(monkeypatch) -> None:
    from anatomap.infer import match as match_module

    seen = []
    refine = match_module._refine
    monkeypatch.setattr(
        match_module, "_refine", lambda *a: (seen.append(torch.get_num_threads()), refine(*a))[1]
    )
    before = torch.get_num_threads()
    try:
        for threads, used in ((2, 1), (4, 2), (1, 1)):
            seen.clear()
            torch.set_num_threads(threads)
            match_points(*_pair())
            assert seen == [used] and torch.get_num_threads() == threads
        monkeypatch.setattr(match_module, "MATCH_THREADS", 3)
        torch.set_num_threads(4)
        seen.clear()
        match_points(*_pair())
        assert seen == [3]
    finally:
        torch.set_num_threads(before)


def test_match_device_cpu_by_name_or_object_is_the_default() -> None:
    template, pts, target = _pair()
    pts = np.array([[10.0, 10.0, 10.0], [6.0, 14.0, 8.0]])
    ref = match_points(template, pts, target)
    for dev in ("cpu", torch.device("cpu")):
        res = match_points(template, pts, target, device=dev)
        np.testing.assert_array_equal(res.points_mm, ref.points_mm)
        np.testing.assert_array_equal(res.scores, ref.scores)
