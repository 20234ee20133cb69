"""Discovery faults (issue 17): special files are skipped with a note and never opened,
unreadable folders are problems, and names that are not UTF-8 never block the others.

Each case sits beside a good subject that must still be indexed (and cached)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomap.cli import main
from anatomap.data import walk as walk_mod
from anatomap.data.cache import build_cache
from anatomap.data.manifest import IndexResult, index_directory, read_manifest, write_manifest

SHAPE = (8, 8, 6)


def nii(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).random(SHAPE, np.float32) + 0.1
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def good(root: Path) -> Path:
    nii(root / "good_T1w.nii.gz")
    return root


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail instead of hanging for ever (a FIFO that is opened blocks the reader)."""

    def boom(*_: object) -> None:
        raise TimeoutError("indexing hung (a special file was opened?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def skipped(result: IndexResult, name: str) -> str:
    hits = [p.reason for p in result.skipped if Path(p.path).name == name]
    assert hits, f"{name} not skipped; skipped: {result.skipped}; problems: {result.problems}"
    return hits[0]


# ------------------------------------------------------------------ special files


@pytest.mark.parametrize(
    "name", ["pipe_T1w.nii.gz", "pipe", "pipe.dcm", "pipe_landmarks.csv", "sub/pipe.mhd"]
)
def test_fifo_is_skipped_never_opened(tmp_path: Path, name: str, deadline: None) -> None:
    root = good(tmp_path / "data")
    (root / name).parent.mkdir(exist_ok=True)
    os.mkfifo(root / name)
    result = index_directory(root)
    assert [s.subject for s in result.subjects] == ["good"]
    assert "FIFO" in skipped(result, Path(name).name) and "not opened" in result.skipped[0].reason
    assert result.problems == []


def test_fifo_in_every_layout_folder(tmp_path: Path, deadline: None) -> None:
    """A FIFO inside a subject folder, a BIDS anat folder and a DICOM tree."""
    fps = tmp_path / "fps"
    nii(fps / "case_1" / "imaging.nii.gz")
    nii(fps / "case_2" / "imaging.nii.gz")
    os.mkfifo(fps / "case_1" / "segmentation.nii.gz")
    result = index_directory(fps)
    assert result.layout == "folder-per-subject" and len(result.subjects) == 2
    assert "FIFO" in skipped(result, "segmentation.nii.gz")
    bids = tmp_path / "bids"
    nii(bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    os.mkfifo(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    result = index_directory(bids)
    assert result.layout == "bids" and list(result.subjects[0].images) == ["T1w"]


def test_socket_and_device_are_skipped(tmp_path: Path, deadline: None) -> None:
    root = good(tmp_path / "d")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "s_T1w.nii.gz"))
        (root / "null_T1w.nii.gz").symlink_to("/dev/null")  # a character device
        (root / "zero").symlink_to("/dev/zero")
        result = index_directory(root)
    finally:
        sock.close()
    assert [s.subject for s in result.subjects] == ["good"] and result.problems == []
    assert "socket" in skipped(result, "s_T1w.nii.gz")
    assert "character device" in skipped(result, "null_T1w.nii.gz")
    assert "character device" in skipped(result, "zero")


def test_fifo_through_the_cli_exits_0_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture, deadline: None
) -> None:
    root = good(tmp_path / "d")
    os.mkfifo(root / "x_T2w.nii.gz")
    assert main(["data", "index", str(root), "--out", str(tmp_path / "m.jsonl"), "--quiet"]) == 0
    assert "FIFO (named pipe), not a regular file: skipped, not opened" in capsys.readouterr().out


# ------------------------------------------------------------------ unreadable folders


def test_unreadable_subfolder_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = good(tmp_path / "d")
    nii(root / "locked" / "other_T1w.nii.gz")
    real = os.scandir

    def scandir(path: object):  # what a folder without read permission does
        if Path(os.fspath(path)).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(walk_mod.os, "scandir", scandir)
    result = index_directory(root)
    assert [s.subject for s in result.subjects] == ["good"]
    [p] = [p for p in result.problems if Path(p.path).name == "locked"]
    assert p.reason == "cannot read folder: Permission denied"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_unreadable_subfolder_for_real(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = good(tmp_path / "d")
    nii(root / "locked" / "other_T1w.nii.gz")
    (root / "locked").chmod(0)
    try:
        code = main(["data", "index", str(root), "--out", str(tmp_path / "m.jsonl"), "--quiet"])
    finally:
        (root / "locked").chmod(0o755)
    assert code == 1 and "locked: cannot read folder" in capsys.readouterr().err


def test_broken_link_and_link_loop(tmp_path: Path, deadline: None) -> None:
    root = good(tmp_path / "d")
    (root / "gone_T1w.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    (root / "sub").mkdir()
    nii(root / "sub" / "x_T1w.nii.gz")
    (root / "sub" / "up").symlink_to(root)  # a loop: walked once
    result = index_directory(root)
    assert sorted(s.subject for s in result.subjects) == ["good", "x"]
    [broken] = [p for p in result.problems if Path(p.path).name == "gone_T1w.nii.gz"]
    assert "broken symbolic link" in broken.reason
    assert any("already walked" in n.reason for n in result.skipped)


# ------------------------------------------------------------------ names that are not UTF-8


def test_non_utf8_names_index_and_cache_with_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = good(tmp_path / "d")
    bad = Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9_T1w.nii.gz"))
    nii(bad, 1)
    nii(Path(os.fsdecode(os.fsencode(root) + b"/\xff\xfe_T1w.nii.gz")), 2)
    manifest = tmp_path / "m.jsonl"
    assert main(["data", "index", str(root), "--out", str(manifest), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "subjects: 3" in printed
    records = {s.subject: s for s in read_manifest(manifest)}
    assert sorted(records) == ["%FF%FE", "caf%E9", "good"]
    assert records["caf%E9"].images["T1w"].path == str(bad)  # the bytes the OS gave
    res = build_cache(manifest, tmp_path / "cache", spacing=2.0, progress=False)
    assert res.problems == [] and sorted(res.cache.subjects) == ["%FF%FE", "caf%E9", "good"]
    assert res.cache["caf%E9"].image.shape[0] == 1


def test_non_utf8_folder_and_label_names(tmp_path: Path) -> None:
    root = tmp_path / "fps"
    raw = os.fsencode(root)
    for case in [b"case_1", b"case_\xe9"]:
        nii(Path(os.fsdecode(raw + b"/" + case + b"/imaging.nii.gz")))
        seg = Path(os.fsdecode(raw + b"/" + case + b"/segmentations/liv\xe9r.nii.gz"))
        nii(seg)
    result = index_directory(root)
    subjects = {s.subject: s for s in result.subjects}
    assert sorted(subjects) == ["case_%E9", "case_1"] and result.problems == []
    assert list(subjects["case_%E9"].labels) == ["liv%E9r"]
    write_manifest(result, tmp_path / "m.jsonl")  # JSON holds the exact bytes (escaped)
    back = {s.subject: s for s in read_manifest(tmp_path / "m.jsonl")}
    assert back["case_%E9"].images["imaging"].path == subjects["case_%E9"].images["imaging"].path


def test_bad_name_in_a_problem_prints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = good(tmp_path / "d")
    Path(os.fsdecode(os.fsencode(root) + b"/br\xefken_T1w.nii.gz")).write_bytes(b"not nifti")
    code = main(["data", "index", str(root), "--out", str(tmp_path / "m.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "br\\xefken_T1w.nii.gz" in err
