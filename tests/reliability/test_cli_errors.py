"""The CLI's one top-level handler: every failure is one line naming the file and the cause,
with a documented exit code (0 ok, 1 some inputs rejected, 2 bad input, 3 I/O failure, 4 out
of memory, 70 internal error, 130 interrupted); a traceback only with ``--debug``; library
warnings once each, in the same one-line format. Commands run in-process through ``main``."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from anatomap.checkpoint import save_checkpoint
from anatomap.cli import main
from anatomap.data.volume import Volume
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config


def cli(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr (C-level writes included) of ``anatomap ARGV``."""
    code = main([str(a) for a in argv])
    return code, capfd.readouterr().err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("anatomap: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def sam_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec("small_cnn", 3, 1, 16, {"channels": [4, 8, 8]}))
    params = {"embed_dim": 8, "fpn_channels": 8, "crop_size": 16}
    objective = get_objective("sam")(objective_config({"name": "sam", **params}), encoder)
    folder = tmp_path_factory.mktemp("run") / "checkpoint"
    meta = {"objective": "sam", "objective_config": params, "data": {"spacing": None}}
    return save_checkpoint(folder, encoder, objective, meta)


# --- I/O failures: exit 3 -----------------------------------------------------------------


def test_output_path_under_a_file_is_an_io_failure(
    tiny_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("x")
    code, err = cli(capfd, "data", "index", tiny_dataset, "--out", tmp_path / "afile" / "m.jsonl")
    assert code == 3
    assert "afile/m.jsonl: could not write manifest" in one_line_error(err)


def test_a_name_too_long_is_an_io_failure(
    tiny_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capfd, "data", "index", tiny_dataset, "--out", tmp_path / ("n" * 300) / "m")
    assert code == 3 and "name too long" in one_line_error(err).lower()


@pytest.mark.parametrize(
    "err_no, words",
    [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")],
)
def test_full_disk_and_read_only_folder(
    tiny_dataset: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    err_no: int,
    words: str,
) -> None:
    real = os.replace

    def refuse(src: object, dst: object) -> None:
        if str(dst).endswith("m.jsonl"):
            raise OSError(err_no, os.strerror(err_no))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", refuse)
    code, err = cli(capfd, "data", "index", tiny_dataset, "--out", tmp_path / "m.jsonl")
    assert code == 3
    line = one_line_error(err)
    assert str(tmp_path / "m.jsonl") in line and words in line.lower()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left


# --- bad input: exit 2 -----------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["0", "-1", "nan", "inf"])
def test_cache_spacing_must_be_finite_and_positive(
    tiny_cache: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], spacing: str
) -> None:
    manifest = tiny_cache.parent / "manifest.jsonl"
    code, err = cli(capfd, "data", "cache", manifest, "--out", tmp_path / "c", "--spacing", spacing)
    assert code == 2 and f"spacing {float(spacing)!r}" in one_line_error(err)
    assert not (tmp_path / "c" / "cache.json").exists()


@pytest.mark.parametrize("option", [("--overlap", "-1"), ("--overlap", "1"), ("--window", "0")])
def test_embed_options_are_validated(
    sam_run: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    option: tuple[str, str],
) -> None:
    scan = tiny_dataset / "sub-00_T1w.nii.gz"
    code, err = cli(capfd, "embed", sam_run, scan, "--out", tmp_path, *option)
    assert code == 2 and option[0].lstrip("-") in one_line_error(err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "content, words",
    [
        (b"name,x,y,z\nf\xe9mur,1,2,3\n", "not UTF-8 text (byte 0xe9"),
        (b"\xff\xfen\x00a\x00m\x00e\x00", "not UTF-8 text (byte 0xff"),
        (b"name,x,y,z\nA,1,nan,3\n", "line 2: coordinates must be finite"),
        (b"name,x,y,z\nA,1,\x00,3\n", "NUL bytes"),
    ],
    ids=["latin1", "utf16", "nan", "nul"],
)
def test_points_files_that_are_not_clean_utf8_csv(
    sam_run: Path,
    tiny_dataset: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    content: bytes,
    words: str,
) -> None:
    points = tmp_path / "p.csv"
    points.write_bytes(content)
    scan = tiny_dataset / "sub-00_T1w.nii.gz"
    argv = ["match", sam_run, scan, "--template", scan, "--points", points, "--window", "16"]
    code, err = cli(capfd, *argv, "--out", tmp_path / "m.csv")
    assert code == 2 and words in one_line_error(err) and str(points) in err


def test_deeply_nested_json_manifest(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"subject": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, err = cli(capfd, "data", "cache", manifest, "--out", tmp_path / "c")
    assert code == 2 and "m.jsonl: line 1: not valid JSON (nested too deeply)" in one_line_error(
        err
    )


# --- the handler itself -----------------------------------------------------------------------


def run_command(func, args):  # type: ignore[no-untyped-def]
    from anatomap.cli.report import run_command as run  # the handler under test

    return run(func, args)


def _raiser(exc: BaseException):  # type: ignore[no-untyped-def]
    def func(args: argparse.Namespace) -> int:
        raise exc

    return func


@pytest.mark.parametrize(
    "exc, code, words",
    [
        (KeyError("subject 'nope' is not in cache c"), 2, "KeyError: \"subject 'nope'"),
        (ValueError("could not broadcast"), 2, "ValueError: could not broadcast"),
        (RecursionError("maximum recursion depth"), 2, "nested too deeply"),
        (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid"), 2, "UnicodeDecodeError"),
        (PermissionError(errno.EACCES, "Permission denied", "/x/y"), 3, "/x/y: Permission denied"),
        (RuntimeError("Error while serializing: No space left on device (os error 28)"), 3, ""),
        (MemoryError(), 4, "out of memory"),
        (TypeError("unsupported operand"), 70, "internal error: TypeError: unsupported operand"),
        (KeyboardInterrupt(), 130, "anatomap: interrupted"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v)[:12],
)
def test_every_failure_is_one_line_with_its_exit_code(
    capfd: pytest.CaptureFixture[str], exc: BaseException, code: int, words: str
) -> None:
    got = run_command(_raiser(exc), argparse.Namespace(debug=False))
    err = capfd.readouterr().err
    assert got == code
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert words in err
    if code == 3 and not words:
        assert "no space left on device" in err


def test_debug_adds_the_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    assert run_command(_raiser(TypeError("boom")), argparse.Namespace(debug=True)) == 70
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().endswith("please report it)")


def test_debug_is_accepted_after_the_sub_command(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capfd, "data", "cache", tmp_path / "none.jsonl", "--out", tmp_path, "--debug")
    assert code == 2 and "Traceback" in err and "manifest not found" in err


# --- warnings: once each, one line, naming the input ----------------------------------------


def test_library_warnings_are_one_line_each_and_once(capfd: pytest.CaptureFixture[str]) -> None:
    def noisy(args: argparse.Namespace) -> int:
        import warnings

        for _ in range(5):
            np.float32(3e38) * np.float32(10)  # numpy: overflow encountered
            warnings.warn("pydicom-like warning\nsecond line", UserWarning, stacklevel=1)
        return 0

    assert run_command(noisy, argparse.Namespace(debug=False)) == 0
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("anatomap: warning: ") for ln in lines), lines
    assert any("overflow" in ln for ln in lines)
    assert any(ln.endswith("pydicom-like warning second line") for ln in lines)


def test_itk_warnings_about_a_scan_are_one_line_naming_it(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from anatomap.io.writers import write_dicom_series

    arr = np.random.default_rng(0).random((12, 12, 10)).astype(np.float32) * 100
    folder = tmp_path / "data" / "pat01"
    files = write_dicom_series(Volume(array=arr, affine=np.diag([1.0, 1.0, 2.0, 1.0])), folder)
    ds = pydicom.dcmread(files[4])  # 0.5% off: within anatomap's tolerance, ITK warns
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [
        float(ds.ImagePositionPatient[2]) + 0.01
    ]
    ds.save_as(files[4])
    code, err = cli(capfd, "data", "index", tmp_path / "data", "--out", tmp_path / "m.jsonl")
    assert code == 0, err
    err = err.replace("\r", "\n")  # the progress bar redraws its line
    warned = [ln for ln in err.splitlines() if "uniform sampling" in ln]
    assert warned == [f"anatomap: warning: {folder}: " + warned[0].split(f"{folder}: ", 1)[1]]
    assert "WARNING: In" not in err and "itkImageSeriesReader" not in err
