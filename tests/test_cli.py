"""Integration tests through the real ``anatomap`` command (subprocesses, as a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ANATOMAP = [sys.executable, "-m", "anatomap.cli"]
TINY = [
    "objective.crop_size=16",
    "objective.num_crops=6",
    "model.options={channels: [8, 16, 32]}",
    "trainer.progress=false",
    "data.num_workers=0",
    "data.samples_per_epoch=16",
    "trainer.checkpoint_every=4",
    "trainer.log_every=2",
]


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*ANATOMAP, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def workdir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("cli")
    run("data", "index", str(tiny_dataset), "--out", "manifest.jsonl", "--quiet", cwd=wd)
    run("data", "cache", "manifest.jsonl", "--out", "cache", "--spacing", "2", "--quiet", cwd=wd)
    return wd


def test_index_cache_pretrain_evaluate(workdir: Path) -> None:
    rows = [json.loads(x) for x in (workdir / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(set(r["images"]) == {"T1w", "T2w"} for r in rows)
    info = json.loads((workdir / "cache" / "cache.json").read_text())
    assert info["modalities"] == ["T1w", "T2w"] and len(info["subjects"]) == 6

    run(
        "pretrain",
        "isimed",
        "data.cache=cache",
        "output=run",
        "trainer.max_steps=8",
        "data.heldout=[sub-04,sub-05]",
        *TINY,
        cwd=workdir,
    )
    ckpt = workdir / "run" / "checkpoint"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 8 and meta["objective"] == "isimed"
    assert meta["data"]["heldout_subjects"] == ["sub-04", "sub-05"]
    assert meta["data"]["fingerprint"] == info["fingerprint"]
    assert meta["encoder"]["in_channels"] == 2
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("encoder.") for k in tensors)
    assert (workdir / "run" / "logs" / "metrics.csv").is_file()
    assert list((workdir / "run" / "tb").glob("events.out.tfevents.*"))

    out = run("evaluate", "run", "--crops", "12", cwd=workdir)
    assert "random init" in out.stdout
    metrics = json.loads((workdir / "run" / "eval" / "metrics.json").read_text())
    for name in ("isimed (pretrained)", "random init"):
        m = metrics["position"]["encoders"][name]
        assert np.isfinite([m["spearman"], m["r2"], m["mean_error_mm"]]).all()
    html = (workdir / "run" / "eval" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Position metrics" in html


def test_resume_continues_step_count(workdir: Path) -> None:
    args = ["data.cache=cache", "output=run_resume", "data.heldout=[sub-05]", *TINY]
    first = run(
        "pretrain", "isimed", "trainer.max_steps=5", *args, "data.num_workers=auto", cwd=workdir
    )
    assert "anatomap: data.num_workers=auto: " in first.stderr  # the loader choice is shown
    # The resume file holds the final step, not only the last periodic one (every 4 steps).
    state = torch.load(workdir / "run_resume" / "lightning" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 5
    refused = run("pretrain", "isimed", "trainer.max_steps=8", *args, cwd=workdir, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    run("pretrain", "isimed", "trainer.max_steps=8", "--resume", *args, cwd=workdir)
    meta = json.loads((workdir / "run_resume" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 8


def test_ddp_two_cpu_processes_end_with_identical_weights(workdir: Path) -> None:
    run(
        "pretrain",
        "isimed",
        "data.cache=cache",
        "output=run_ddp",
        "trainer.max_steps=4",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        *TINY,
        cwd=workdir,
    )
    ranks = json.loads((workdir / "run_ddp" / "ranks.json").read_text())
    assert ranks["world_size"] == 2
    assert len(ranks["fingerprints"]) == 2
    assert ranks["fingerprints"][0] == ranks["fingerprints"][1]


def test_errors_are_one_line_and_name_the_problem(workdir: Path, tmp_path: Path) -> None:
    bad = run("pretrain", "isimed", "data.cache=cache", "trainer.lrr=1", cwd=workdir, check=False)
    assert bad.returncode == 2
    assert "unknown key 'trainer.lrr'" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("evaluate", str(tmp_path), cwd=workdir, check=False)
    assert missing.returncode == 2 and "not an anatomap checkpoint" in missing.stderr
    nocache = run(
        "pretrain", "isimed", f"data.cache={tmp_path}", "output=x", cwd=workdir, check=False
    )
    assert nocache.returncode == 2 and "not an anatomap cache" in nocache.stderr


def test_index_exit_code_reports_rejected_files(tiny_dataset: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in list(tiny_dataset.glob("sub-00_*"))[:3]:
        (scans / f.name).write_bytes(f.read_bytes())
    (scans / "sub-99_T1w.nii.gz").write_bytes(b"\x1f\x8b\x08broken")
    proc = run(
        "data", "index", str(scans), "--out", "m.jsonl", "--quiet", cwd=tmp_path, check=False
    )
    assert proc.returncode == 1
    assert "sub-99_T1w.nii.gz" in proc.stderr
    rows = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["subject"] == "sub-00"


def test_demo_end_to_end_and_idempotent(tmp_path: Path) -> None:
    """`anatomap demo` on a tiny build: scans -> index -> cache -> ISImed -> report; a second
    run reuses the scans and the cache."""
    args = [
        "demo",
        "--out",
        "d",
        "--subjects",
        "4",
        "--heldout",
        "2",
        "--spacing",
        "4",
        "--quiet",
        "--no-matching",
        "trainer.max_steps=3",
        *TINY[:3],
        "data.num_workers=0",
    ]
    first = run(*args, cwd=tmp_path)
    assert "built 4, reused 0" in first.stdout
    report = tmp_path / "d" / "runs" / "isimed" / "eval" / "report.html"
    assert report.is_file()
    metrics = json.loads(report.with_name("metrics.json").read_text())
    assert metrics["subjects"] == ["sub-002", "sub-003"]
    image = tmp_path / "d" / "data" / "images" / "sub-000_synth.nii.gz"
    stamp = image.stat().st_mtime_ns
    second = run(*args, cwd=tmp_path)
    assert "built 0, reused 4" in second.stdout
    assert image.stat().st_mtime_ns == stamp


SAM_TINY = [
    "objective.crop_size=16",
    "objective.fine_anchors=32",
    "objective.hard_pool=32",
    "objective.hard_keep=8",
    "objective.coarse_anchors=8",
    "objective.coarse_global_negatives=16",
    "model.options={channels: [8, 16, 32, 32]}",
    "trainer.batch_size=2",
    *TINY[3:],
]


def test_sam_embed_and_match_through_the_cli(workdir: Path, tiny_dataset: Path) -> None:
    run(
        "pretrain",
        "sam",
        "data.cache=cache",
        "output=run_sam",
        "trainer.max_steps=3",
        "data.heldout=[sub-05]",
        *SAM_TINY,
        cwd=workdir,
    )
    scans = [tiny_dataset / "sub-04_T1w.nii.gz", tiny_dataset / "sub-05_T1w.nii.gz"]
    run("embed", "run_sam", *map(str, scans), "--out", "emb", "--window", "16", cwd=workdir)
    saved = sorted(p.name for p in (workdir / "emb").iterdir())
    assert saved == ["sub-04_T1w.emb.safetensors", "sub-05_T1w.emb.safetensors"]

    (workdir / "points.csv").write_text("name,i,j,k\nA,10,12,11\nB,5,6,7\n")
    out = run(
        "match",
        "run_sam",
        "emb/sub-05_T1w.emb.safetensors",
        "--template",
        str(scans[0]),
        "--points",
        "points.csv",
        "--voxel",
        "--out",
        "m.csv",
        "--window",
        "16",
        cwd=workdir,
    )
    assert "2 matches" in out.stdout
    rows = (workdir / "m.csv").read_text().splitlines()
    assert rows[0].split(",") == [
        "target",
        "name",
        "template_x",
        "template_y",
        "template_z",
        "x",
        "y",
        "z",
        "i",
        "j",
        "k",
        "score",
        "low_confidence",
        "consistent",
    ]
    assert len(rows) == 3 and rows[1].endswith(",")  # 2 points: no consistency verdict
    assert json.loads((workdir / "m.csv.json").read_text())[1]["name"] == "B"

    # A point outside the template, and a checkpoint without dense heads: clear messages.
    (workdir / "far.csv").write_text("name,x,y,z\nfar,500,500,500\n")
    far = run(
        "match",
        "run_sam",
        str(scans[1]),
        "--template",
        str(scans[0]),
        "--points",
        "far.csv",
        "--window",
        "16",
        cwd=workdir,
        check=False,
    )
    assert far.returncode == 2 and "outside the template image" in far.stderr
    run(
        "pretrain",
        "isimed",
        "data.cache=cache",
        "output=run_not_dense",
        "trainer.max_steps=1",
        *TINY,
        cwd=workdir,
    )
    notdense = run("embed", "run_not_dense", str(scans[0]), "--out", "e2", cwd=workdir, check=False)
    assert notdense.returncode == 2 and "no dense" in notdense.stderr
