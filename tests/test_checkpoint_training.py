"""Checkpoint format and safety; training stops cleanly on a non-finite loss."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from anatomap.checkpoint import load_checkpoint, save_checkpoint
from anatomap.config import load_config
from anatomap.errors import CheckpointError
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives import isimed
from anatomap.objectives.registry import OBJECTIVES, register_objective
from anatomap.train.module import NonFiniteLossError
from anatomap.train.pretrain import pretrain


class _Boom:
    def __reduce__(self):  # executed by pickle.load if anything unpickled it
        return (Path.touch, (Path(self.marker),))

    def __init__(self, marker: str) -> None:
        self.marker = marker


def test_malicious_pickle_in_a_checkpoint_folder_is_never_executed(tmp_path: Path) -> None:
    enc = build_encoder(EncoderSpec("small_cnn", options={"channels": [8, 16]}))
    folder = save_checkpoint(tmp_path / "ckpt", enc, None, {"objective": "isimed"})
    marker = tmp_path / "executed"
    for name in ("model.pt", "model.ckpt", "optimizer.pkl"):
        (folder / name).write_bytes(pickle.dumps(_Boom(str(marker))))
    loaded = load_checkpoint(folder)
    assert not marker.exists()
    assert isinstance(loaded.encoder, torch.nn.Module)
    # A checkpoint whose weights file is itself a pickle is refused, not unpickled.
    (folder / "model.safetensors").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_checkpoint_rejects_mismatched_weights(tmp_path: Path) -> None:
    enc = build_encoder(EncoderSpec("small_cnn", options={"channels": [8, 16]}))
    folder = save_checkpoint(tmp_path / "c", enc, None, {"objective": "isimed"})
    meta = json.loads((folder / "meta.json").read_text())
    meta["encoder"]["options"] = {"channels": [8, 32]}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"do not match|size mismatch"):
        load_checkpoint(folder)


def test_save_replaces_atomically(tmp_path: Path) -> None:
    enc = build_encoder(EncoderSpec("small_cnn", options={"channels": [8, 16]}))
    save_checkpoint(tmp_path / "c", enc, None, {"objective": "isimed", "step": 1})
    save_checkpoint(tmp_path / "c", enc, None, {"objective": "isimed", "step": 2})
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp leftovers


class _NanObjective(isimed.ISImed):
    calls = 0

    def forward(self, encoder, batch):
        out = super().forward(encoder, batch)
        type(self).calls += 1
        if type(self).calls > 2:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_with_step_and_subjects_and_keeps_checkpoint(
    tiny_cache: Path, tmp_path: Path
) -> None:
    register_objective("_nan_after_two_steps")(_NanObjective)  # only for this test
    try:
        cfg = load_config(
            overrides=[
                f"data.cache={tiny_cache}",
                f"output={tmp_path / 'run'}",
                "data.num_workers=0",
                "objective.name=_nan_after_two_steps",
                "objective.crop_size=8",
                "objective.num_crops=4",
                "trainer.max_steps=10",
                "trainer.checkpoint_every=1",
                "trainer.progress=false",
                "data.samples_per_epoch=8",
                "trainer.batch_size=2",
                "model.options={channels: [8, 16]}",
            ]
        )
        with pytest.raises(NonFiniteLossError, match=r"at step 2 on subjects sub-\d\d"):
            pretrain(cfg)
    finally:
        OBJECTIVES.pop("_nan_after_two_steps", None)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 2
    loaded = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in loaded.encoder.parameters())
