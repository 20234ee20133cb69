"""Memory bombs, hangs and confinement from tiny files: sizes are checked from headers before
any voxel is read, special files are never opened, and every file a header names stays
inside the data folders. Reads that could hang or exhaust memory on a regressed reader run
in a child process with a memory and a time limit."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anatomap import limits
from anatomap.data.manifest import index_directory, write_manifest
from anatomap.errors import VolumeError
from anatomap.io import read_volume

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    from anatomap.errors import VolumeError
    from anatomap.io import read_volume
    for path in sys.argv[1:]:
        try:
            read_volume(path)
            answer = "READ"
        except VolumeError as exc:
            answer = f"REFUSED {exc}"
        except BaseException as exc:
            answer = f"CRASH {type(exc).__name__}: {exc}"
        print(json.dumps([path, answer]), flush=True)
    """
)


def isolated_reads(paths: list[Path], timeout: float = 90) -> dict[str, str]:
    """``read_volume`` of each path in one child process (3 GB of address space, ``timeout``
    s in all): ``{path: one-line answer}``; paths not reached are missing."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return dict(json.loads(line) for line in out.splitlines() if line.startswith("["))


def nifti_gz_bomb(path: Path, n: int) -> Path:
    """A ~n^3/1000-byte ``.nii.gz`` of n^3 uint8 zeros (gzip members of 1 MiB of zeros)."""
    hdr = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).header.copy()
    hdr.set_data_shape((n, n, n))
    hdr["vox_offset"] = 352
    member = gzip.compress(b"\0" * (1 << 20), compresslevel=9)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(hdr.binaryblock + b"\0" * 4))
        for _ in range(-(-(n**3) // (1 << 20))):
            fh.write(member)
    return path


def mhd(path: Path, data_file: str, dims: tuple[int, ...] = (4, 4, 4), **extra: str) -> Path:
    lines = [
        "ObjectType = Image",
        f"NDims = {len(dims)}",
        f"DimSize = {' '.join(map(str, dims))}",
        "ElementSpacing = 1 1 1",
        "ElementType = MET_UCHAR",
        *(f"{k} = {v}" for k, v in extra.items()),
        f"ElementDataFile = {data_file}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def nhdr(path: Path, data_file: str, dims: tuple[int, ...] = (4, 4, 4)) -> Path:
    path.write_text(
        "NRRD0004\ntype: uint8\ndimension: 3\n"
        f"sizes: {' '.join(map(str, dims))}\nencoding: raw\ndata file: {data_file}\n"
    )
    return path


# --- reads that would hang or exhaust memory: one child process for them all --------------


def _bomb(root: Path) -> Path:
    return nifti_gz_bomb(root / "bomb.nii.gz", 1000)


def _dev_zero_mhd(root: Path) -> Path:
    return mhd(root / "zero.mhd", "/dev/zero", (700, 700, 700))


def _dev_zero_nhdr(root: Path) -> Path:
    return nhdr(root / "zero.nhdr", "/dev/zero", (700, 700, 700))


def _fifo_data(root: Path) -> Path:
    os.mkfifo(root / "fifo.raw")
    return mhd(root / "fifo.mhd", "fifo.raw")


def _fifo_in_list(root: Path) -> Path:
    (root / "s0.raw").write_bytes(bytes(16))
    os.mkfifo(root / "s1.raw")
    path = mhd(root / "list.mhd", "LIST")
    path.write_text(path.read_text() + "s0.raw\ns1.raw\n")
    return path


def _zero_size_file_list(root: Path) -> Path:
    """Found by the header fuzzer: ITK divided by zero (SIGFPE killed the process)."""
    for i in range(3):
        (root / f"s{i:02d}.raw").write_bytes(bytes(130))
    return mhd(root / "empty.mhd", "s%02d.raw 0 2 1", (5000, 0), ElementNumberOfChannels="9")


def _fifo_scan(root: Path) -> Path:
    os.mkfifo(root / "x.nii.gz")
    return root / "x.nii.gz"


def _fifo_in_dicom_folder(root: Path) -> Path:
    folder = root / "pat01"
    folder.mkdir()
    (folder / "IM0001").write_bytes(b"\0" * 128 + b"DICM")
    os.mkfifo(folder / "IM0002")
    return folder


ISOLATED = {
    "bomb": (_bomb, "more than the limit"),
    "dev_zero_mhd": (_dev_zero_mhd, "data file /dev/zero is a character device"),
    "dev_zero_nhdr": (_dev_zero_nhdr, "data file /dev/zero is a character device"),
    "fifo_data_file": (_fifo_data, "data file fifo.raw is a FIFO"),
    "fifo_in_a_list_of_data_files": (_fifo_in_list, "data file s1.raw is a FIFO"),
    "zero_size_with_a_file_list": (_zero_size_file_list, "image has no voxels"),
    "fifo_named_like_a_scan": (_fifo_scan, "a FIFO, not a regular file; not opened"),
    "fifo_in_dicom_folder": (_fifo_in_dicom_folder, "folder holds a FIFO (IM0002)"),
}


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("isolated")
    paths = {name: make(root) for name, (make, _) in ISOLATED.items()}
    assert paths["bomb"].stat().st_size < 1.1e6  # 10^9 voxels in ~1 MB
    answers = isolated_reads(list(paths.values()))
    return {name: answers.get(str(p), "TIMEOUT (not answered)") for name, p in paths.items()}


@posix_only
@pytest.mark.parametrize("case", sorted(ISOLATED))
def test_bombs_and_special_files_are_refused_quickly(isolated: dict[str, str], case: str) -> None:
    answer = isolated[case]
    assert answer.startswith("REFUSED") and ISOLATED[case][1] in answer, answer


# --- memory bombs ---------------------------------------------------------------------------


def test_the_voxel_limit_applies_to_every_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_VOXELS", 4**3 - 1)
    (tmp_path / "d.raw").write_bytes(bytes(64))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    cases = [
        tmp_path / "a.nii.gz",
        mhd(tmp_path / "b.mhd", "d.raw"),
        nhdr(tmp_path / "c.nhdr", "d.raw"),
    ]
    for path in cases:
        with pytest.raises(VolumeError, match=r"64 values .* more than the limit of 63"):
            read_volume(path)
    monkeypatch.setattr(limits, "MAX_VOXELS", 4**3)
    for path in cases:
        assert read_volume(path).shape == (4, 4, 4)


def test_a_bomb_in_a_folder_loses_only_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _good(data)
    nib.save(nib.Nifti1Image(np.zeros((9, 9, 9), np.uint8), np.eye(4)), data / "sub-02_T1w.nii.gz")
    monkeypatch.setattr(limits, "MAX_VOXELS", 8**3)  # sub-02 stands for the 1000^3 bomb
    res = index_directory(data)
    assert [s.subject for s in res.subjects] == ["sub-01"]
    assert any("more than the limit" in p.reason for p in res.problems)


@pytest.mark.parametrize("make", [mhd, nhdr], ids=["mhd", "nhdr"])
def test_detached_header_declaring_a_huge_volume_is_refused(tmp_path: Path, make) -> None:
    (tmp_path / "d.raw").write_bytes(bytes(64))
    path = make(tmp_path / ("h.mhd" if make is mhd else "h.nhdr"), "d.raw", (2000, 2000, 2000))
    with pytest.raises(VolumeError, match="more than the limit"):
        read_volume(path)


def test_detached_data_file_smaller_than_declared_is_refused_before_reading(
    tmp_path: Path,
) -> None:
    (tmp_path / "d.raw").write_bytes(bytes(10))
    with pytest.raises(VolumeError, match=r"truncated voxel data: the data file.* 10 bytes"):
        read_volume(mhd(tmp_path / "h.mhd", "d.raw", (400, 400, 400)))


def test_compressed_detached_data_cannot_inflate_past_the_ratio(tmp_path: Path) -> None:
    (tmp_path / "d.zraw").write_bytes(b"x" * 100)
    path = mhd(tmp_path / "h.mhd", "d.zraw", (500, 500, 500), CompressedData="True")
    with pytest.raises(VolumeError, match="more than 100 compressed bytes can hold"):
        read_volume(path)


def test_pattern_naming_a_billion_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="too many data files"):
        read_volume(mhd(tmp_path / "h.mhd", "s%09d.raw 0 999999999 1"))


# --- special files ------------------------------------------------------------------------


# --- confinement ----------------------------------------------------------------------------


def _good(folder: Path, name: str = "sub-01_T1w.nii.gz") -> None:
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)), folder / name)


@pytest.mark.parametrize(
    "name", ["../../elsewhere/secret.raw", "{outside}", "LIST"], ids=["dotdot", "absolute", "list"]
)
def test_table_confinement_extends_to_the_files_a_header_names(tmp_path: Path, name: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.raw").write_bytes(bytes(range(64)))
    data = tmp_path / "site" / "data"
    data.mkdir(parents=True)
    _good(data)
    header = mhd(data / "sub-02_T1w.mhd", name.format(outside=elsewhere / "secret.raw"))
    if name == "LIST":
        header.write_text(header.read_text() + f"{elsewhere / 'secret.raw'}\n")
    table = data / "table.csv"
    table.write_text(
        "subject,modality,path\nsub-01,T1w,sub-01_T1w.nii.gz\nsub-02,T1w,sub-02_T1w.mhd\n"
    )
    res = index_directory(data, table=table)
    assert [s.subject for s in res.subjects] == ["sub-01"]
    (problem,) = [p for p in res.problems if "sub-02" in p.path]
    assert "outside the data folders" in problem.reason
    write_manifest(res, tmp_path / "m.jsonl")
    assert "secret" not in (tmp_path / "m.jsonl").read_text()


def test_folder_scan_confines_header_data_files_to_the_data_root(tmp_path: Path) -> None:
    (tmp_path / "secret.raw").write_bytes(bytes(64))
    data = tmp_path / "data"
    data.mkdir()
    _good(data)
    mhd(data / "sub-02_T1w.mhd", "../secret.raw")
    (data / "inside.raw").write_bytes(bytes(64))
    mhd(data / "sub-03_T1w.mhd", "inside.raw")
    res = index_directory(data)
    assert [s.subject for s in res.subjects] == ["sub-01", "sub-03"]
    assert any("outside the data folders" in p.reason for p in res.problems)


# --- silent wrong numbers (reader) ---------------------------------------------------------


@pytest.mark.parametrize("value", [1e39, -1e300, 3.5e38])
def test_float64_values_that_overflow_float32_are_rejected(tmp_path: Path, value: float) -> None:
    arr = np.ones((6, 6, 6), np.float64)
    arr[1, 2, 3] = value
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    with pytest.raises(VolumeError, match=r"1 voxel value\(s\) of 216 overflow float32"):
        read_volume(path)
    arr[1, 2, 3] = 3.0e38  # the largest float32 values still fit
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    assert np.isfinite(read_volume(path).array).all()


def test_manifest_is_standard_json_whatever_the_values(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _good(data)
    arr = np.ones((6, 6, 6), np.float64)
    arr[0, 0, 0] = 1e39
    nib.save(nib.Nifti1Image(arr, np.eye(4)), data / "sub-02_T1w.nii.gz")
    nan = np.ones((6, 6, 6), np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), data / "sub-03_T1w.nii.gz")
    for check in (True, False):
        res = index_directory(data, check_finite=check)
        out = write_manifest(res, tmp_path / f"m{check}.jsonl")
        for line in out.read_text().splitlines():
            json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert any("overflow float32" in p.reason for p in index_directory(data).problems)
