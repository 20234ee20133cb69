"""Two faults left after round 2: a crafted embedding holding NaN, a full disk at lock time."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from anatomap.errors import AnatomapError
from anatomap.infer.embed import DenseEmbedding
from anatomap.io import lock as lock_mod


def _embedding(value: float) -> DenseEmbedding:
    coarse = torch.nn.functional.normalize(torch.rand(8, 3, 3, 3), dim=0)
    fine = torch.nn.functional.normalize(torch.rand(8, 6, 6, 6), dim=0)
    fine[0, 1, 2, 3] = value
    return DenseEmbedding(coarse, fine, np.diag([8.0, 8, 8, 1]), np.diag([2.0, 2, 2, 1]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_an_embedding_with_non_finite_values_is_refused_naming_the_file(
    tmp_path: Path, value: float
) -> None:
    path = _embedding(value).save(tmp_path / "bad.emb.safetensors")
    with pytest.raises(AnatomapError, match=r"bad\.emb\.safetensors: .*NaN or infinite"):
        DenseEmbedding.load(path)


def test_a_finite_embedding_still_loads(tmp_path: Path) -> None:
    emb = _embedding(0.5)
    loaded = DenseEmbedding.load(emb.save(tmp_path / "ok.emb.safetensors"))
    assert torch.allclose(loaded.fine.float(), emb.fine.float(), atol=1e-3)  # stored float16


def test_a_full_disk_while_taking_the_lock_names_the_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock_mod.os, "pwrite", full)
    with (
        pytest.raises(lock_mod.LockError, match=r"\.anatomap\.lock: .*no space left on device"),
        lock_mod.folder_lock(tmp_path / "cache", "cache"),
    ):
        pass
