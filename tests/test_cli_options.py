"""Issue 16's consistent CLI: every sub-command's ``--help`` shows its defaults, every one
takes ``--quiet``, ``--device`` is checked before any work (one error line, exit 2), and
``match`` writes the usual table plus a sphere label image on the target's grid."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anatomap.checkpoint import save_checkpoint
from anatomap.cli import build_parser, main
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable (sub-)command: its words and its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, p in action.choices.items():
            yield from _commands(p, (*path, name))


COMMANDS = list(_commands(build_parser()))


def _ids(item: tuple[tuple[str, ...], argparse.ArgumentParser]) -> str:
    return " ".join(item[0])


def test_every_command_is_found() -> None:
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"data index", "data cache", "embed", "match", "evaluate", "mine", "models"} <= names


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", COMMANDS, ids=_ids)
def test_help_shows_every_default(command: tuple[tuple[str, ...], argparse.ArgumentParser]) -> None:
    words, parser = command
    text = _flat(parser.format_help())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"anatomap {' '.join(words)}: {name} has no help text"
        default = action.default
        if default is None or default is False or default in ("", [], ()):
            continue
        assert f"default: {default}" in text, f"anatomap {' '.join(words)}: {name} hides {default}"


def _minimal_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Values for the required arguments of a command (parsing only: nothing runs)."""
    argv: list[str] = []
    for action in parser._actions:
        value = str(action.choices[0]) if action.choices else "x"  # type: ignore[index]
        if action.option_strings and action.required:
            argv += [action.option_strings[0], value]
        elif not action.option_strings and action.nargs not in ("?", "*"):
            argv.append(value)
    return argv


@pytest.mark.parametrize("command", COMMANDS, ids=_ids)
def test_every_command_takes_quiet(
    command: tuple[tuple[str, ...], argparse.ArgumentParser],
) -> None:
    words, parser = command
    args = build_parser().parse_args([*words, *_minimal_argv(parser), "--quiet"])
    assert args.quiet is True


def test_match_has_window_overlap_batch_size_device_precision() -> None:
    args = build_parser().parse_args(
        [
            *("match", "ck", "b.nii.gz", "--template", "a.nii.gz", "--points", "p.csv"),
            *("--window", "32", "--overlap", "0.5", "--batch-size", "4", "--device", "cpu"),
            *("--precision", "fp32", "--spheres", "s.nii.gz", "--sphere-radius", "3"),
        ]
    )
    assert (args.window, args.overlap, args.batch_size) == (32, 0.5, 4)
    assert (args.device, args.precision, args.sphere_radius) == ("cpu", "fp32", 3.0)


def _one_error(capfd: pytest.CaptureFixture[str]) -> str:
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("anatomap: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["embed", "/no/ckpt", "/no/a.nii.gz", "--out", "/no/emb"],
        ["match", "/no/ckpt", "/no/b.nii.gz", "--template", "/no/a.nii.gz", "--points", "p"],
        ["evaluate", "/no/run"],
        ["mine", "/no/alice.yaml"],
    ],
    ids=["embed", "match", "evaluate", "mine"],
)
def test_an_unknown_device_is_one_line_before_any_work(
    argv: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--device", "tpu"]) == 2
    assert "device 'tpu'" in _one_error(capfd)


def test_a_bad_sphere_file_name_is_refused_before_matching(
    capfd: pytest.CaptureFixture[str],
) -> None:
    argv = ["match", "/no/ckpt", "/no/b.nii.gz", "--template", "/no/a.nii.gz", "--points", "p"]
    assert main([*argv, "--device", "cpu", "--spheres", "s.png"]) == 2
    assert "s.png: a sphere image must end with" in _one_error(capfd)


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny SAM checkpoint (random weights: enough to run the command)."""
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec("small_cnn", 3, 1, 16, {"channels": [4, 8, 8]}))
    params = {"embed_dim": 8, "fpn_channels": 8, "crop_size": 16}
    objective = get_objective("sam")(objective_config({"name": "sam", **params}), encoder)
    folder = tmp_path_factory.mktemp("run") / "checkpoint"
    meta = {"objective": "sam", "objective_config": params, "data": {"spacing": None}}
    return save_checkpoint(folder, encoder, objective, meta)


def test_match_writes_the_table_and_spheres_on_the_target_grid(
    sam_checkpoint: Path, tiny_dataset: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    template, target = tiny_dataset / "sub-00_T1w.nii.gz", tiny_dataset / "sub-01_T1w.nii.gz"
    points = tmp_path / "p.csv"
    points.write_text("name,i,j,k\nA,10,12,11\nB,5,6,7\n")
    out, spheres = tmp_path / "m.csv", tmp_path / "s.nii.gz"
    argv = ["match", sam_checkpoint, target, "--template", template, "--points", points]
    argv += ["--voxel", "--window", "16", "--overlap", "0.5", "--device", "cpu", "--quiet"]
    code = main([str(a) for a in [*argv, "--out", out, "--spheres", spheres]])
    printed = capfd.readouterr()
    assert code == 0, printed.err
    assert f"spheres: {spheres}" in printed.out and "windows" not in printed.err  # --quiet
    rows = list(csv.DictReader(out.open()))
    assert [r["name"] for r in rows] == ["A", "B"] and out.with_name("m.csv.json").is_file()
    img, scan = nib.load(str(spheres)), nib.load(str(target))
    assert img.shape == scan.shape and np.allclose(img.affine, scan.affine)
    labels = np.asarray(img.dataobj)
    for n, r in enumerate(rows):
        ijk = tuple(round(float(r[c])) for c in "ijk")
        assert labels[ijk] == n + 1
