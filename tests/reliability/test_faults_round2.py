"""Faults, round 2: DICOM geometry that cannot be checked, a full disk under any writer (no
temporary file left, the message says so), and ``pretrain --resume`` with the wrong cache
(refused before the run folder changes)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from anatomap.config import load_config
from anatomap.data.cache import build_cache
from anatomap.data.volume import Volume
from anatomap.errors import AnatomapError, VolumeError
from anatomap.io import read_volume
from anatomap.io.atomic import WriteError, atomic_path, atomic_write_bytes
from anatomap.io.writers import write_dicom_series
from anatomap.train.pretrain import pretrain

# --- DICOM geometry -------------------------------------------------------------------------


def series(folder: Path) -> list[Path]:
    arr = np.random.default_rng(0).random((8, 8, 6)).astype(np.float32) * 100
    return write_dicom_series(Volume(array=arr, affine=np.diag([0.8, 0.8, 2.0, 1.0])), folder)


@pytest.mark.parametrize("tag", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_a_slice_without_position_is_rejected_not_unchecked(tmp_path: Path, tag: str) -> None:
    files = series(tmp_path / "pat")
    files[3].unlink()  # a missing slice ...
    ds = pydicom.dcmread(files[1])
    delattr(ds, tag)  # ... that the gap check must not skip
    ds.save_as(files[1])
    with pytest.raises(VolumeError, match="1 of 5 slice\\(s\\) lack ImagePositionPatient"):
        read_volume(tmp_path / "pat")


@pytest.mark.parametrize("value", [[0, 0], [0.8, 0], [-0.8, 0.8], ["nan", "0.8"], [0.8]], ids=str)
def test_invalid_pixel_spacing_is_rejected_not_read_as_1mm(tmp_path: Path, value: object) -> None:
    files = series(tmp_path / "pat")
    ds = pydicom.dcmread(files[2])
    ds.PixelSpacing = value
    ds.save_as(files[2])
    with pytest.raises(VolumeError, match="PixelSpacing"):
        read_volume(tmp_path / "pat")


def test_a_clean_series_still_reads(tmp_path: Path) -> None:
    series(tmp_path / "pat")
    vol = read_volume(tmp_path / "pat")
    assert vol.shape == (8, 8, 6) and np.allclose(vol.spacing, (0.8, 0.8, 2.0))


# --- full disk --------------------------------------------------------------------------------


def test_a_library_error_that_means_disk_full_says_so(tmp_path: Path) -> None:
    dest = tmp_path / "x.emb.safetensors"
    dest.write_bytes(b"previous")
    full = r"x\.emb\.safetensors: could not write .*no space left"
    with pytest.raises(WriteError, match=full), atomic_path(dest) as tmp:
        tmp.write_bytes(b"")  # what safetensors raises when the disk is full:
        raise RuntimeError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.emb.safetensors"]


def test_no_zero_byte_file_is_left_beside_a_failed_write(tmp_path: Path) -> None:
    dest = tmp_path / "scan.mhd"
    with pytest.raises(WriteError, match="no space left"), atomic_path(dest, suffix=".mhd") as tmp:
        tmp.write_text("ObjectType = Image\n")  # ITK writes a .raw beside the header
        tmp.with_suffix(".raw").write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_a_synced_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    def full(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        fh = real_open(path, mode, *args, **kwargs)
        if "w" in mode and ".tmp" in str(path):
            fh.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return fh

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(
        WriteError, match=r"f\.json: could not write file \(no space left on device\)"
    ):
        atomic_write_bytes(tmp_path / "f.json", b"{}")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# --- pretrain --resume with the wrong cache -------------------------------------------------


def _state(run: Path) -> dict[str, tuple[int, bytes]]:
    return {
        name: ((run / name).stat().st_mtime_ns, (run / name).read_bytes())
        for name in ("config.yaml", "run.json")
    }


def test_resume_with_a_wrong_cache_is_refused_before_anything_is_rewritten(
    overrides: Callable[..., list[str]], tiny_cache: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    pretrain(load_config(overrides=overrides(run, 1)))
    before = _state(run)
    missing = load_config(overrides=overrides(run, 2, **{"data.cache": tmp_path / "none"}))
    with pytest.raises(AnatomapError, match="not an anatomap cache"):
        pretrain(missing, resume=True)
    assert _state(run) == before
    other = build_cache(
        tiny_cache.parent / "manifest.jsonl", tmp_path / "other", spacing=3.0, progress=False
    )
    another = load_config(overrides=overrides(run, 2, **{"data.cache": other.cache.root}))
    with pytest.raises(AnatomapError, match=r"trained on cache .* resume with the same cache"):
        pretrain(another, resume=True)
    assert _state(run) == before
    no_split = load_config(overrides=overrides(run, 2, **{"data.heldout_file": "none.csv"}))
    with pytest.raises((AnatomapError, OSError), match=r"none\.csv"):
        pretrain(no_split, resume=True)
    assert _state(run) == before
