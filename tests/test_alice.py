"""Alice: the pure losses (centring, temperatures, masking), CAFA, the EMA teacher, and SAM
view mining (cached, provenance recorded) with its dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anatomap.checkpoint import save_checkpoint
from anatomap.data.cache import Cache
from anatomap.data.pairs import MINING_FILE, MinedPairDataset, MiningError
from anatomap.errors import ConfigError
from anatomap.infer.mining import checkpoint_fingerprint, load_or_mine, mine_pairs
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.alice import CAFA, Alice
from anatomap.objectives.alice_losses import (
    apply_mask,
    distillation_ce,
    mask_to_voxels,
    masked_mse,
    patchify,
    random_patch_mask,
    teacher_probs,
    teacher_temperature,
    updated_center,
)
from anatomap.objectives.registry import objective_config

SMALL = {
    "crop_size": 16,
    "out_dim": 32,
    "head_hidden": 16,
    "head_bottleneck": 8,
    "cafa_dim": 16,
    "cross_volume": False,
}


def _alice(**over):
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 16, {"channels": [8, 16, 32]}))
    obj = Alice(objective_config({"name": "alice", **SMALL, **over}), enc)
    return enc, obj


def _batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    aff = torch.eye(4, dtype=torch.float64).expand(b, 2, 4, 4).clone()
    aff[..., :3, 3] = torch.rand(b, 2, 3, generator=g, dtype=torch.float64) * 10
    return {
        "image": torch.rand(b, 2, 1, 16, 16, 16, generator=g),
        "affine": aff,
        "modality_mask": torch.ones(b, 1, dtype=torch.bool),
        "subject": [f"s{i}" for i in range(b)],
    }


# ---------------------------------------------------------------------------- pure losses


def test_teacher_temperature_warms_up_linearly_then_holds() -> None:
    assert teacher_temperature(0, 10, 0.008, 0.01) == pytest.approx(0.008)
    assert teacher_temperature(5, 10, 0.008, 0.01) == pytest.approx(0.009)
    assert teacher_temperature(10, 10, 0.008, 0.01) == pytest.approx(0.01)
    assert teacher_temperature(500, 10, 0.008, 0.01) == pytest.approx(0.01)
    assert teacher_temperature(3, 0, 0.008, 0.01) == pytest.approx(0.01)


def test_centre_update_is_an_ema_of_the_batch_mean() -> None:
    c = torch.tensor([1.0, -1.0, 0.0])
    t = torch.tensor([[[2.0, 0.0, 1.0]], [[4.0, 2.0, 3.0]]])  # [2, 1, 3]: mean [3, 1, 2]
    new = updated_center(c, t, 0.9)
    assert torch.allclose(new, 0.9 * c + 0.1 * torch.tensor([3.0, 1.0, 2.0]))


def test_centring_removes_a_shared_offset_and_temperature_sharpens() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g) * 0.1
    bias = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])  # one prototype dominates every row
    center = torch.zeros(8)
    for _ in range(200):
        center = updated_center(center, logits + bias, 0.9)
    uncentred = teacher_probs(logits + bias, torch.zeros(8), 0.5).mean(0)
    centred = teacher_probs(logits + bias, center, 0.5).mean(0)
    assert uncentred[0] > 0.5  # collapse onto prototype 0 without centring
    assert (centred - 1 / 8).abs().max() < 0.05  # close to uniform after centring
    # A lower temperature gives a sharper (lower-entropy) teacher.
    ent = [
        -torch.special.xlogy(p, p).sum(-1).mean()
        for p in (teacher_probs(logits, center, t) for t in (0.01, 0.1, 1.0))
    ]
    assert ent[0] < ent[1] < ent[2]


def test_distillation_ce_matches_reference_and_only_student_gets_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, requires_grad=True)
    t = torch.randn(5, 7, generator=g, requires_grad=True)
    c = torch.randn(7, generator=g)
    loss = distillation_ce(s, t, c, 0.1, 0.04)
    p_t = F.softmax((t.detach() - c) / 0.04, -1)
    ref = -(p_t * F.log_softmax(s.detach() / 0.1, -1)).sum(-1).mean()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_masking_ratio_is_honoured(ratio: float) -> None:
    mask = random_patch_mask(6, (4, 4, 4), ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (6, 4, 4, 4) and mask.dtype == torch.bool
    assert (mask.flatten(1).sum(1) == round(ratio * 64)).all()
    if ratio > 0:  # different samples get different masks
        assert not torch.equal(mask[0], mask[1])


def test_apply_mask_and_patchify_agree_on_masked_patches() -> None:
    x = torch.rand(2, 2, 8, 8, 8)
    mask = random_patch_mask(2, (2, 2, 2), 0.75, torch.Generator().manual_seed(3))
    value = torch.tensor([5.0, -5.0])
    y = apply_mask(x, mask, 4, value)
    vox = mask_to_voxels(mask, 4)
    assert torch.all(y[:, 0][vox] == 5.0) and torch.all(y[:, 1][vox] == -5.0)
    assert torch.equal(y[:, 0][~vox], x[:, 0][~vox])
    p = patchify(x, 4)  # [2, 2*64, 2, 2, 2]
    assert p.shape == (2, 128, 2, 2, 2)
    # Patch (1, 0, 1) of sample 1 holds exactly that block's voxels.
    block = x[1, :, 4:8, 0:4, 4:8].reshape(-1)
    assert torch.equal(p[1, :, 1, 0, 1].sort().values, block.sort().values)
    # The MSE counts masked patches only.
    pred = p.clone()
    pred[:, :, ~mask[0]] += 100.0  # errors where sample 0 is visible...
    err = masked_mse(pred[:1], p[:1], mask[:1])
    assert err == 0.0
    pred2 = p.clone() + 1.0
    assert masked_mse(pred2, p, mask) == pytest.approx(1.0)


def test_cafa_output_shape_and_gradient_flow() -> None:
    torch.manual_seed(0)
    cafa = CAFA(channels=24, dim=16, heads=8)
    q = torch.randn(3, 5, 24, requires_grad=True)
    ctx = torch.randn(3, 11, 24, requires_grad=True)
    out = cafa(q, ctx)
    assert out.shape == (3, 5, 24)
    out.pow(2).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0  # the queries use the context
    assert all(p.grad is not None for p in cafa.parameters())


# ---------------------------------------------------------------------------- objective


def test_teacher_gets_no_gradients_and_follows_the_student_by_ema() -> None:
    enc, obj = _alice()
    out = obj(enc, _batch())
    assert {"global", "mim", "cafa"} <= set(out)
    out["loss"].backward()
    for m in obj.teacher_modules():
        for p in m.parameters():
            assert not p.requires_grad and p.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.cafa.parameters())
    # The optimiser would skip the teacher; move the student and update the teacher.
    before = [p.clone() for p in obj.teacher.parameters()]
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    obj.on_after_step(enc, 0, 10)  # momentum 0.996 at step 0
    moved = [(p - b) for p, b in zip(obj.teacher.parameters(), before, strict=True)]
    assert all(torch.allclose(d, torch.full_like(d, 0.004), atol=1e-5) for d in moved)
    assert int(obj.step) == 0
    obj.on_after_step(enc, 5, 10)
    assert int(obj.step) == 5
    assert obj._teacher_temperature() == pytest.approx(0.008 + 0.002 * 5 / 100)


def test_pieces_switch_off() -> None:
    enc, obj = _alice(mim_weight=0.0, cafa_weight=0.0)
    out = obj(enc, _batch())
    assert "mim" not in out and "cafa" not in out and "global" in out
    enc, obj = _alice(global_weight=0.0)
    out = obj(enc, _batch())
    assert "global" not in out and {"mim", "cafa"} <= set(out)
    with pytest.raises(ConfigError):
        objective_config({"name": "alice", "global_weight": 0, "mim_weight": 0, "cafa_weight": 0})
    with pytest.raises(ConfigError, match="patch_size"):
        _alice(patch_size=16)  # small_cnn [8, 16, 32] has strides 2, 4, 8


def test_centre_moves_in_training_only() -> None:
    enc, obj = _alice()
    obj.eval()
    obj(enc, _batch())
    assert torch.all(obj.center == 0) and torch.all(obj.patch_center == 0)
    obj.train()
    obj(enc, _batch())
    assert obj.center.abs().sum() > 0 and obj.patch_center.abs().sum() > 0


# ---------------------------------------------------------------------------- mining


@pytest.fixture(scope="module")
def sam_checkpoint(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained SAM checkpoint recorded as trained on the tiny cache."""
    from anatomap.objectives.sam import SAM

    cache = Cache(tiny_cache)
    torch.manual_seed(0)
    spec = EncoderSpec("small_cnn", 3, len(cache.modalities), 16, {"channels": [8, 16, 32]})
    enc = build_encoder(spec)
    params = objective_config({"name": "sam", "embed_dim": 16, "fpn_channels": 8})
    obj = SAM(params, enc)
    meta = {
        "objective": "sam",
        "objective_config": params.model_dump(mode="json"),
        "data": {"spacing": cache.spacing, "modalities": cache.modalities},
        "step": 0,
    }
    return save_checkpoint(tmp_path_factory.mktemp("sam") / "checkpoint", enc, obj, meta)


def test_mining_is_cached_with_its_provenance(
    tiny_cache: Path, sam_checkpoint: Path, tmp_path: Path
) -> None:
    cache = Cache(tiny_cache)
    subjects = cache.subjects[:4]
    out = tmp_path / "mined"
    kw = {"pairs_per_subject": 3, "threshold": -1.0, "max_tries": 5, "window": 16}
    mined = mine_pairs(cache, subjects, sam_checkpoint, out, **kw)
    assert len(mined) == 12 and mined.info["failed"] == 0
    info = json.loads((out / MINING_FILE).read_text())
    assert info["sam_fingerprint"] == checkpoint_fingerprint(sam_checkpoint)
    assert info["sam_checkpoint"] == str(sam_checkpoint.resolve())
    assert info["cache_fingerprint"] == cache.fingerprint()
    assert all(a != b for a, b in zip(mined.subject_a, mined.subject_b, strict=True))
    assert (mined.score >= -1).all() and (mined.score <= 1).all()
    for sid, vox in zip(mined.subject_b, mined.voxel_b, strict=True):
        assert (vox >= 0).all() and (vox <= np.asarray(cache[sid].shape) - 1).all()
    # Embeddings are stored once per subject; a second call reads everything back.
    embs = sorted(p.name for p in (out / "embeddings").iterdir())
    assert len(embs) == 4
    stamp = {p: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    again = load_or_mine(cache, subjects, sam_checkpoint, out, seed=0, **kw)
    assert again.subject_a == mined.subject_a and np.array_equal(again.voxel_b, mined.voxel_b)
    assert {p: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == stamp
    # Other parameters against the same folder: an error naming the field.
    with pytest.raises(MiningError, match="threshold"):
        load_or_mine(cache, subjects, sam_checkpoint, out, **{**kw, "threshold": 0.9})
    # An unreachable threshold keeps nothing: a clear error.
    with pytest.raises(MiningError, match="no pair reached"):
        mine_pairs(cache, subjects, sam_checkpoint, tmp_path / "none", **{**kw, "threshold": 1.01})


def test_mined_dataset_views_cross_or_same_volume(
    tiny_cache: Path, sam_checkpoint: Path, tmp_path: Path
) -> None:
    cache = Cache(tiny_cache)
    subjects = cache.subjects[:4]
    mined = mine_pairs(
        cache,
        subjects,
        sam_checkpoint,
        tmp_path / "m",
        pairs_per_subject=2,
        threshold=-1.0,
        max_tries=3,
        window=16,
    )
    _, obj = _alice()
    spec = obj.view_spec()
    cross = MinedPairDataset(cache, subjects, spec, 6, seed=0, pairs=mined)
    same = MinedPairDataset(cache, subjects, spec, 6, seed=0, pairs=mined, cross_volume=False)
    s = cross[0]
    assert s["image"].shape == (2, len(cache.modalities), 16, 16, 16)
    assert s["affine"].shape == (2, 4, 4) and ">" in s["subject"]
    a, b = s["subject"].split(">")
    assert a != b
    assert torch.equal(cross[3]["image"], cross[3]["image"])  # replayable
    t = same[0]
    assert ">" not in t["subject"] and t["subject"] == a  # the same pair's volume A
    # Both views of the same-volume ablation are centred on the same world point.
    from anatomap import geometry

    centres = geometry.box_center(t["affine"], (16, 16, 16))
    assert torch.allclose(centres[0], centres[1], atol=3.0)
    # A same-volume run needs no SAM checkpoint; a cross-volume one does.
    with pytest.raises(ConfigError, match="sam_checkpoint"):
        Alice.mining_request(objective_config({"name": "alice", **SMALL, "cross_volume": True}))
    assert Alice.mining_request(objective_config({"name": "alice", **SMALL})) is None
    with pytest.raises(ConfigError, match="sam_checkpoint"):
        Alice.train_dataset(
            objective_config({"name": "alice", **SMALL, "cross_volume": True}),
            cache,
            subjects,
            spec,
            4,
            0,
        )
    ds = Alice.train_dataset(
        objective_config({"name": "alice", **SMALL}), cache, subjects, spec, 4, 0
    )
    assert ds[0]["image"].shape[0] == 2


def test_pretrain_mines_once_then_trains(
    tiny_cache: Path, sam_checkpoint: Path, tmp_path: Path
) -> None:
    from anatomap.config import load_config
    from anatomap.train.pretrain import pretrain

    mined = tmp_path / "mined"
    base = {
        "data": {"cache": str(tiny_cache), "heldout": ["sub-05"], "samples_per_epoch": 4},
        "model": {"name": "small_cnn", "embed_dim": 16, "options": {"channels": [8, 16, 32]}},
        "objective": {
            "name": "alice",
            **SMALL,
            "cross_volume": True,
            "sam_checkpoint": str(sam_checkpoint),
            "mining_dir": str(mined),
            "mine_pairs_per_subject": 2,
            "mine_threshold": -1.0,
            "mine_tries": 3,
            "mine_window": 16,
        },
        "trainer": {"max_steps": 2, "batch_size": 2, "progress": False, "accelerator": "cpu"},
        "output": str(tmp_path / "run"),
    }
    res = pretrain(load_config(base=base))
    assert res.steps == 2 and (res.checkpoint / "model.safetensors").is_file()
    info = json.loads((mined / MINING_FILE).read_text())
    assert "sub-05" not in info["subjects"] and len(info["subjects"]) == 5
    assert info["sam_fingerprint"] == checkpoint_fingerprint(sam_checkpoint)
