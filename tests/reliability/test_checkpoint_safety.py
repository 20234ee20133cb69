"""Checkpoints: atomic writes, disk full, interrupted swaps, and nothing foreign unpickled."""

from __future__ import annotations

import errno
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anatomap.checkpoint import load_checkpoint, save_checkpoint
from anatomap.config import load_config
from anatomap.errors import AnatomapError, CheckpointError
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.train import resume as ckpt_mod
from anatomap.train.pretrain import pretrain
from anatomap.train.resume import SafeCheckpointIO, load_resume_file


class _Boom:
    """Unpickling this creates ``marker``: proof that something executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


def encoder(seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return build_encoder(EncoderSpec("small_cnn", options={"channels": [8, 16]}))


def _disk_full_after(monkeypatch: pytest.MonkeyPatch, n_bytes: int) -> None:
    """Make every synced write put ``n_bytes`` on disk, then fail with ENOSPC."""

    def write(path: Path, data: bytes | memoryview) -> None:
        with open(path, "wb") as fh:
            fh.write(bytes(data)[:n_bytes])
        raise OSError(errno.ENOSPC, "No space left on device")

    import anatomap.checkpoint
    import anatomap.io.atomic

    monkeypatch.setattr(anatomap.checkpoint, "write_synced", write)
    monkeypatch.setattr(anatomap.io.atomic, "write_synced", write)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = encoder(0)
    save_checkpoint(tmp_path / "c", first, None, {"objective": "isimed", "step": 1})
    _disk_full_after(monkeypatch, 100)
    with pytest.raises(CheckpointError, match=r"c: could not write checkpoint \(no space left"):
        save_checkpoint(tmp_path / "c", encoder(1), None, {"objective": "isimed", "step": 2})
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.meta["step"] == 1
    for k, v in first.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[k], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp leftovers


def test_disk_full_while_writing_the_resume_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "lightning" / "last.ckpt"
    io.save_checkpoint({"anatomap": {"format": ckpt_mod.RESUME_FORMAT}, "global_step": 1}, path)
    _disk_full_after(monkeypatch, 10)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: could not write .*no space left"):
        io.save_checkpoint({"anatomap": {"format": ckpt_mod.RESUME_FORMAT}, "global_step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_disk_full_during_training_stops_cleanly_and_keeps_last_checkpoint(
    overrides: Callable[..., list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anatomap.io.atomic import write_synced as real

    calls = {"n": 0}

    def write(path: Path, data: bytes | memoryview) -> None:
        calls["n"] += 1
        if calls["n"] > 11:  # config.yaml, run.json, then 3 files a step (weights, meta, resume)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    import anatomap.checkpoint
    import anatomap.io.atomic

    monkeypatch.setattr(anatomap.checkpoint, "write_synced", write)
    monkeypatch.setattr(anatomap.io.atomic, "write_synced", write)
    cfg = load_config(overrides=overrides(tmp_path / "run", 6))
    with pytest.raises(CheckpointError, match="no space left on device"):
        pretrain(cfg)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run").meta["step"] == 3
    assert load_resume_file(tmp_path / "run" / "lightning" / "last.ckpt")["global_step"] == 3


def test_a_save_killed_between_its_renames_loses_nothing(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", encoder(0), None, {"objective": "isimed", "step": 1})
    # what a kill -9 between "checkpoint -> .checkpoint.old" and "tmp -> checkpoint" leaves
    (tmp_path / "c").rename(tmp_path / ".c.old")
    (tmp_path / ".c.tmp999").mkdir()
    (tmp_path / ".c.tmp999" / "model.safetensors").write_bytes(b"half")
    assert load_checkpoint(tmp_path / "c").meta["step"] == 1  # readers fall back
    save_checkpoint(tmp_path / "c", encoder(1), None, {"objective": "isimed", "step": 2})
    assert load_checkpoint(tmp_path / "c").meta["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_replaced_or_damaged_weights_are_refused(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "c", encoder(0), None, {"objective": "isimed"})
    other = save_checkpoint(tmp_path / "d", encoder(1), None, {"objective": "isimed"})
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "meta",
    [
        "[1, 2]",
        '{"format": "anatomap-checkpoint", "format_version": "x"}',
        '{"format": "anatomap-checkpoint", "format_version": 1}',
        '{"format": "anatomap-checkpoint", "format_version": 1, "encoder": {"name": 3}}',
        '{"format": "anatomap-checkpoint", "format_version": 1, "encoder": {"name": "nope"}}',
        "\xff\xfe not json",
    ],
)
def test_malformed_meta_json_gives_a_checkpoint_error(tmp_path: Path, meta: str) -> None:
    folder = save_checkpoint(tmp_path / "c", encoder(0), None, {"objective": "isimed"})
    (folder / "meta.json").write_bytes(meta.encode("latin-1"))
    with pytest.raises(CheckpointError, match=str(folder)):
        load_checkpoint(folder)


def test_malicious_resume_file_is_never_unpickled(
    overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    """A pickle planted as RUN/lightning/last.ckpt: `--resume` refuses it, nothing runs."""
    marker = tmp_path / "executed"
    run = tmp_path / "run"
    (run / "lightning").mkdir(parents=True)
    payload = {"state_dict": {}, "anatomap": {"format": ckpt_mod.RESUME_FORMAT}, "x": _Boom(marker)}
    for save in (lambda f: pickle.dump(payload, f), lambda f: torch.save(payload, f)):
        with open(run / "lightning" / "last.ckpt", "wb") as fh:
            save(fh)
        with pytest.raises(CheckpointError, match="refused to load"):
            pretrain(load_config(overrides=overrides(run, 2)), resume=True)
        with pytest.raises(CheckpointError, match="refused to load"):
            SafeCheckpointIO().load_checkpoint(run / "lightning" / "last.ckpt", weights_only=False)
        assert not marker.exists()
    # a plain tensor file without anatomap's marker is not taken as a resume file either
    torch.save({"state_dict": {}}, run / "lightning" / "last.ckpt")
    with pytest.raises(AnatomapError, match="not a resume file written by anatomap"):
        pretrain(load_config(overrides=overrides(run, 2)), resume=True)


def test_pickles_beside_a_checkpoint_are_ignored_by_every_loader(tmp_path: Path) -> None:
    """Pickles in the checkpoint folder (model.pt, *.ckpt, *.pkl) are never opened."""
    from anatomap.checkpoint import load_objective

    marker = tmp_path / "executed"
    enc = encoder(0)
    meta = {"objective": "isimed", "objective_config": {"name": "isimed"}}
    folder = save_checkpoint(tmp_path / "ckpt", enc, None, meta)
    for name in ("model.pt", "model.ckpt", "optimizer.pkl", "last.ckpt"):
        (folder / name).write_bytes(pickle.dumps(_Boom(marker)))
    loaded = load_checkpoint(folder)
    assert load_objective(loaded) is not None
    assert not marker.exists()
    assert json.loads((folder / "meta.json").read_text())["weights_sha256"]
