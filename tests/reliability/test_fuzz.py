"""Fuzzing (hypothesis): random bytes, random NIfTI headers and random configs never give
anything but the clean error (an AnatomapError subclass) or a valid result."""

from __future__ import annotations

import contextlib
import struct
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anatomap.checkpoint import load_checkpoint
from anatomap.config import RunConfig, load_config
from anatomap.errors import CheckpointError, ConfigError, VolumeError
from anatomap.io import read_volume

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def check_volume(path: Path) -> None:
    """read_volume either raises VolumeError naming the file or returns a sane volume."""
    try:
        vol = read_volume(path)
    except VolumeError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert vol.array.ndim == 3 and vol.array.dtype == np.float32
    assert np.isfinite(vol.array).all() and np.isfinite(vol.affine).all()


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]))
def test_random_bytes(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x{suffix}"
        path.write_bytes(data)
        check_volume(path)


def _valid_nifti() -> bytes:
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), np.eye(4))
    return img.to_bytes()


BASE = _valid_nifti()
# (offset, struct format) of NIfTI-1 header fields worth breaking
FIELDS = [
    (40, "<8h"),  # dim
    (70, "<h"),  # datatype
    (72, "<h"),  # bitpix
    (76, "<8f"),  # pixdim
    (108, "<f"),  # vox_offset
    (112, "<2f"),  # scl_slope, scl_inter
    (252, "<2h"),  # qform_code, sform_code
    (256, "<6f"),  # quatern_b..qoffset_z
    (280, "<12f"),  # srow_x, srow_y, srow_z
]
number = st.one_of(
    st.integers(-40000, 40000),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0, -1, 1, 3, 4, 7, 16, 64, 2**15 - 1]),
)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(FIELDS) - 1), st.lists(number, min_size=12)), max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(0, len(BASE))),
    gz=st.booleans(),
)
def test_random_nifti_headers(edits: list, cut: int | None, gz: bool) -> None:
    raw = bytearray(BASE)
    for field, values in edits:
        offset, fmt = FIELDS[field]
        n = struct.calcsize(fmt) // struct.calcsize("<" + fmt[-1])
        kind = fmt[-1]
        vals = [int(v) if kind == "h" and np.isfinite(v) else v for v in values[:n]]
        if kind == "h":
            vals = [max(-32768, min(32767, v)) if isinstance(v, int) else 0 for v in vals]
        else:
            vals = [float(v) for v in vals]
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *vals)
    data = bytes(raw[:cut] if cut is not None else raw)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x.nii.gz" if gz else "x.nii")
        if gz:
            import gzip

            data = gzip.compress(data)
        path.write_bytes(data)
        check_volume(path)


scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)
KEYS = [
    "data",
    "model",
    "objective",
    "trainer",
    "output",
    "cache",
    "name",
    "max_steps",
    "batch_size",
    "lr",
    "crop_size",
    "options",
    "embed_dim",
    "spatial_dims",
    "bogus",
]
tree = st.recursive(
    scalar,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(KEYS), children, max_size=4),
    ),
    max_leaves=12,
)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(KEYS), tree, max_size=5))
def test_random_config_trees(doc: dict) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert str(path) in str(exc)
            return
        assert isinstance(cfg, RunConfig)


@FUZZ
@given(text=st.text(max_size=200), overrides=st.lists(st.text(max_size=20), max_size=3))
def test_random_config_text_and_overrides(text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text, encoding="utf-8")
        with contextlib.suppress(ConfigError):
            load_config(path, overrides)


@FUZZ
@given(meta=st.binary(max_size=300), weights=st.binary(max_size=300))
def test_random_checkpoint_files(meta: bytes, weights: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "meta.json").write_bytes(meta)
        (folder / "model.safetensors").write_bytes(weights)
        with contextlib.suppress(CheckpointError):
            load_checkpoint(folder)
