"""The one atomic-write helper (``anatomap.io.atomic``) and the writers that go through it."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import anatomap.io.atomic as atomic
from anatomap.io.atomic import (
    WriteError,
    atomic_folder,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_lines,
    atomic_write_text,
)


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_writer_that_raises_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"previous"
    assert _names(tmp_path) == ["data.bin"]


def test_interrupt_mid_write_leaves_the_previous_file(tmp_path: Path) -> None:
    dest = tmp_path / "lines.txt"
    atomic_write_lines(dest, ["a", "b"])

    def lines() -> Iterator[str]:
        yield "new"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_lines(dest, lines())
    assert dest.read_text() == "a\nb\n"
    assert _names(tmp_path) == ["lines.txt"]


def test_disk_full_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "meta.json"
    atomic_write_json(dest, {"v": 1})

    def full_disk(path: str | Path, data: bytes | memoryview) -> None:
        Path(path).write_bytes(bytes(data)[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "write_synced", full_disk)
    with pytest.raises(WriteError) as info:
        atomic_write_json(dest, {"v": 2})
    msg = str(info.value)
    assert "\n" not in msg
    assert str(dest) in msg and "no space left on device" in msg
    assert json.loads(dest.read_text()) == {"v": 1}
    assert _names(tmp_path) == ["meta.json"]


@pytest.mark.usefixtures("umask_022")
def test_new_files_follow_the_umask(tmp_path: Path) -> None:
    text = atomic_write_text(tmp_path / "a.txt", "hello")
    raw = atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    with atomic_path(tmp_path / "c.npy", suffix=".npy") as tmp:
        np.save(tmp, np.arange(3))
    for path in (text, raw, tmp_path / "c.npy"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.arange(3))


def test_atomic_folder_replaces_an_existing_folder(tmp_path: Path) -> None:
    dest = tmp_path / "series"
    dest.mkdir()
    (dest / "old.dcm").write_text("old")
    with atomic_folder(dest) as tmp:
        (tmp / "new.dcm").write_text("new")
    assert _names(dest) == ["new.dcm"]
    assert _names(tmp_path) == ["series"]


def test_atomic_folder_rolls_back_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "series"
    dest.mkdir()
    (dest / "old.dcm").write_text("old")
    with pytest.raises(ValueError, match="bad slice"), atomic_folder(dest) as tmp:
        (tmp / "new.dcm").write_text("new")
        raise ValueError("bad slice")
    assert _names(dest) == ["old.dcm"]
    assert _names(tmp_path) == ["series"]


def test_atomic_write_json_never_writes_nan_or_infinity(tmp_path: Path) -> None:
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": (math.nan, 2)}}
    text = atomic_write_json(tmp_path / "m.json", obj).read_text()
    assert "NaN" not in text and "Infinity" not in text

    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=reject) == {
        "a": None,
        "b": [None, None, 1.5],
        "c": {"d": [None, 2]},
    }


def test_write_volume_failure_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anatomap.io.writers as writers
    from anatomap.data.volume import Volume
    from anatomap.errors import VolumeError

    def broken(array: np.ndarray, affine: np.ndarray, tmp: Path, dest: Path) -> None:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("itk failed")

    monkeypatch.setattr(writers, "_write_itk", broken)
    with pytest.raises(VolumeError, match="write failed: itk failed"):
        writers.write_volume(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "x.mha")
    assert _names(tmp_path) == []


def test_failed_export_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anatomap.infer.export as export
    from anatomap.checkpoint import save_checkpoint
    from anatomap.models.encoders import EncoderSpec, build_encoder
    from anatomap.objectives.registry import get_objective, objective_config

    spec = EncoderSpec("small_cnn", 3, 1, 8, {"channels": [4, 8], "num_groups": 2})
    enc = build_encoder(spec)
    params = objective_config({"name": "isimed", "crop_size": 8})
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        enc,
        get_objective("isimed")(params, enc),
        {"objective": "isimed", "objective_config": params.model_dump()},
    )
    out = tmp_path / "out"

    def killed(module: torch.jit.ScriptModule, path: str, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a module")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export.torch.jit, "save", killed)
    with pytest.raises(WriteError, match="no space left on device"):
        export.export_checkpoint(ckpt, "torchscript", out / "enc.pt", size=8)
    assert not out.exists() or _names(out) == []
