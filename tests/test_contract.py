"""The contract every registered objective and encoder must pass (generated from the
registries, as timm does): finite loss, gradients reach the encoder, determinism with a
seed, and a save/load round trip through the checkpoint format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anatomap.checkpoint import load_checkpoint, save_checkpoint
from anatomap.data.sampler import LocatedViewDataset
from anatomap.models.encoders import EncoderSpec, build_encoder, list_encoders
from anatomap.objectives.registry import get_objective, list_objectives, objective_config

# Small settings per objective so the contract runs in seconds on a CPU.
SMALL = {
    "sam": {
        "crop_size": 16,
        "fine_anchors": 32,
        "hard_pool": 32,
        "hard_keep": 8,
        "coarse_anchors": 8,
        "coarse_global_negatives": 16,
    },
    "isimed": {"num_crops": 4, "crop_size": 16},
    # Same-volume views from the standard sampler here (mining is tested in test_alice.py).
    "alice": {
        "crop_size": 16,
        "cross_volume": False,
        "out_dim": 32,
        "head_hidden": 16,
        "head_bottleneck": 8,
        "cafa_dim": 16,
    },
    "simclr": {"crop_size": 16, "hidden_dim": 16, "proj_dim": 8},
    "voco": {"crop_size": 16, "num_bases": 2, "num_random": 1, "hidden_dim": 16, "proj_dim": 8},
    "spatial_aware": {"num_views": 4, "crop_size": 16, "head_hidden": 16},
    "topo": {
        "crop_size": 16,
        "embed_dim": 16,
        "fpn_channels": 8,
        "coarse_level": 1,
        "anchors": 16,
        "candidates": 128,
        "coarse_anchors": 8,
        "inter_start_step": 0,
        "inter_threshold": -1.0,
    },
}
# Encoders whose input must be a multiple of 32 voxels.
MIN_SIZE = {"swinunetr": 32, "resnet": 32}
SMALL_OPTIONS = {
    "small_cnn": {"channels": [8, 16, 32]},
    "resnet": {"depth": 10},
    "segresnet": {"init_filters": 8},
    "swinunetr": {"feature_size": 12, "num_heads": [3, 3, 3, 3]},
}


def _objective_params(name: str, encoder: str) -> dict:
    params = dict(SMALL.get(name, {}))
    if encoder in MIN_SIZE and "crop_size" in params:
        params["crop_size"] = MIN_SIZE[encoder]
    return params


def _setup(objective: str, encoder: str, cache_dir: Path, seed: int = 0):
    from anatomap.data.cache import Cache

    torch.manual_seed(seed)
    cache = Cache(cache_dir)
    spec = EncoderSpec(encoder, 3, len(cache.modalities), 16, SMALL_OPTIONS.get(encoder, {}))
    enc = build_encoder(spec)
    params = objective_config({"name": objective, **_objective_params(objective, encoder)})
    obj = get_objective(objective)(params, enc)
    ds = LocatedViewDataset(cache, cache.subjects, obj.view_spec(), 2, seed=seed)
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    return enc, obj, batch


@pytest.mark.parametrize("encoder", list_encoders())
@pytest.mark.parametrize("objective", list_objectives())
def test_objective_encoder_contract(
    objective: str, encoder: str, tiny_cache: Path, tmp_path: Path
) -> None:
    enc, obj, batch = _setup(objective, encoder, tiny_cache)
    out = obj(enc, batch)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), out
    loss.backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached encoder"
    assert all(g is None or torch.isfinite(g).all() for g in grads)

    # Determinism: same seed -> same weights, same batch, same loss.
    enc2, obj2, batch2 = _setup(objective, encoder, tiny_cache)
    assert torch.equal(batch["image"], batch2["image"])
    assert torch.allclose(obj2(enc2, batch2)["loss"], loss, rtol=1e-5, atol=1e-6)

    # Save / load round trip: identical outputs after reloading.
    save_checkpoint(tmp_path / "ckpt", enc, obj, {"objective": objective, "objective_config": {}})
    loaded = load_checkpoint(tmp_path / "ckpt")
    enc.eval()
    x = batch["image"][:, 0]
    with torch.no_grad():
        assert torch.allclose(enc(x).pooled, loaded.encoder(x).pooled, atol=1e-6)
    for k, v in obj.state_dict().items():
        assert torch.equal(loaded.objective_state[k], v)


@pytest.mark.parametrize("encoder", list_encoders())
def test_encoder_interface_2d_and_3d(encoder: str) -> None:
    size = MIN_SIZE.get(encoder, 16)
    for dims in (2, 3):
        spec = EncoderSpec(encoder, dims, 2, 12, SMALL_OPTIONS.get(encoder, {}))
        enc = build_encoder(spec)
        out = enc(torch.randn(2, 2, *([size] * dims)))
        assert out.pooled.shape == (2, 12)
        assert out.features.shape[:2] == (2, enc.feature_channels)
        assert out.features.ndim == dims + 2
        # The pyramid's declared channels and strides are what it produces.
        levels = enc.pyramid(torch.randn(2, 2, *([size] * dims)))
        assert [t.shape[1] for t in levels] == enc.pyramid_channels
        assert [size // t.shape[2] for t in levels] == enc.pyramid_strides
        assert levels[-1].shape[1] == out.features.shape[1]


def test_different_seeds_give_different_weights() -> None:
    torch.manual_seed(0)
    a = build_encoder(EncoderSpec("small_cnn"))
    torch.manual_seed(1)
    b = build_encoder(EncoderSpec("small_cnn"))
    assert not np.allclose(a.proj.weight.detach(), b.proj.weight.detach())
