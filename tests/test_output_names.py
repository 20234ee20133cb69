"""Per-scan outputs are named so that they cannot collide: ``s0001/ct.nii.gz`` and
``s0002/ct.nii.gz`` give two embedding files, not one overwritten twice."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from _position_maps import PoolModel

from anatomap.api import embed
from anatomap.infer.embed import DenseEmbedding, embedding_names


def scan(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).random((16, 16, 16), np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def test_same_file_name_in_two_subject_folders_gives_two_embeddings(tmp_path: Path) -> None:
    a = scan(tmp_path / "data" / "s0001" / "ct.nii.gz", 0)
    b = scan(tmp_path / "data" / "s0002" / "ct.nii.gz", 1)
    embed(PoolModel(), [a, b], out=tmp_path / "emb", window=16)
    files = sorted(p.relative_to(tmp_path / "emb") for p in (tmp_path / "emb").rglob("*.emb.*"))
    assert [str(f) for f in files] == ["s0001/ct.emb.safetensors", "s0002/ct.emb.safetensors"]
    first = DenseEmbedding.load(tmp_path / "emb" / files[0])
    second = DenseEmbedding.load(tmp_path / "emb" / files[1])
    assert first.source == str(a) and second.source == str(b)
    assert not torch.equal(first.fine, second.fine)


def test_embedding_names() -> None:
    assert embedding_names(["x/a.nii.gz", "y/b.nrrd"]) == ["a.emb.safetensors", "b.emb.safetensors"]
    assert embedding_names(["/d/s1/ct.nii.gz", "/d/s2/sub/ct.nii.gz"]) == [
        "s1/ct.emb.safetensors",
        "s2/sub/ct.emb.safetensors",
    ]
    assert embedding_names(["/d/ct.nii", "/d/ct.nii.gz"]) == [
        "ct.nii.emb.safetensors",
        "ct.nii.gz.emb.safetensors",
    ]
    assert embedding_names(["/d/a.nii", "/d/a.nii"]) == ["a.emb.safetensors"] * 2
