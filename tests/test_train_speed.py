"""Training speed (issue 18): batched SAM loss, batched augmentation, the loader choice,
channels-last / bf16 / compile switches of ``pretrain``.

``LegacySAM`` is SAM's loss as it was before the batched rewrite (one Python loop over volumes
x directions, negatives gathered as vectors); the new one must give the same loss (1e-5) and
gradients for the same batch and seeds: it draws the same random numbers in the same order and
mines the same negatives, only the order of float32 sums differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from anatomap import geometry
from anatomap.config import load_config
from anatomap.data.cache import Cache
from anatomap.data.sampler import IntensityAugment, LocatedViewDataset, augment_batch
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.base import batch_generator, flatten_views
from anatomap.objectives.sam import SAM, SAMConfig, info_nce, mine_hard_negatives, outside_radius
from anatomap.train import module as train_module
from anatomap.train import pretrain as pretrain_mod
from anatomap.train.module import PretrainModule, ViewDataModule, choose_workers
from anatomap.train.pretrain import pretrain


class LegacySAM(SAM):
    """SAM's loss as it was before the batched rewrite (issue 18): one Python loop over
    volumes x directions, every loss term computed per pair."""

    def forward(self, encoder, batch):  # type: ignore[no-untyped-def]
        images = batch["image"]
        b = images.shape[0]
        coarse, fine = self.dense(encoder, flatten_views(images))
        coarse = coarse.view(b, 2, *coarse.shape[1:]).float()
        fine = fine.view(b, 2, *fine.shape[1:]).float()
        affines = batch["affine"].to(torch.float64)
        c_aff = geometry.feature_affine(affines, self.strides[0])
        f_aff = geometry.feature_affine(affines, self.strides[1])
        gen = batch_generator(batch)
        fine_losses, coarse_losses = [], []
        for i in range(b):
            for a, o in ((0, 1), (1, 0)):
                fl = self._legacy_fine(
                    fine[i, a], fine[i, o], coarse[i, a], coarse[i, o],
                    f_aff[i, a], f_aff[i, o], c_aff[i, a], c_aff[i, o], gen,
                )  # fmt: skip
                if fl is not None:
                    fine_losses.append(fl)
                others = [coarse[j, v] for j in range(b) if j != i for v in (0, 1)]
                cl = self._legacy_coarse(
                    coarse[i, a], coarse[i, o], c_aff[i, a], c_aff[i, o], others, gen
                )
                if cl is not None:
                    coarse_losses.append(cl)
        zero = images.sum() * 0.0
        fine_l = torch.stack(fine_losses).mean() if fine_losses else zero
        coarse_l = torch.stack(coarse_losses).mean() if coarse_losses else zero
        return {
            "loss": fine_l + coarse_l,
            "fine": fine_l.detach(),
            "coarse": coarse_l.detach(),
            "pairs": torch.tensor(float(len(fine_losses))),
        }

    @staticmethod
    def _legacy_anchors(map_a, map_o, aff_a, aff_o, count, gen):  # type: ignore[no-untyped-def]
        world_a = geometry.world_grid(aff_a, tuple(map_a.shape[1:])).reshape(-1, 3)
        in_o = geometry.world_to_voxel(aff_o, world_a)
        overlap = geometry.inside(in_o, tuple(map_o.shape[1:])).nonzero().flatten()
        if len(overlap) < 1:
            return None
        pick = overlap[torch.randperm(len(overlap), generator=gen)[:count]]
        anchors = F.normalize(map_a.flatten(1).T[pick], dim=-1)
        return pick, world_a[pick], anchors, geometry.sample_map(map_o, in_o[pick])

    def _legacy_fine(  # type: ignore[no-untyped-def]
        self, fa, fo, ca, co, faff_a, faff_o, caff_a, caff_o, gen
    ):
        c = self.config
        found = self._legacy_anchors(fa, fo, faff_a, faff_o, c.fine_anchors, gen)
        if found is None:
            return None
        _, anchor_w, anchors, positives = found
        cand_w = geometry.world_grid(faff_o, tuple(fo.shape[1:])).reshape(-1, 3)
        sub = torch.randperm(len(cand_w), generator=gen)[: c.fine_candidates]
        cand, cand_w = fo.flatten(1).T[sub], cand_w[sub]
        valid = outside_radius(anchor_w, cand_w, c.fine_ignore_mm)
        with torch.no_grad():
            anchor_c = geometry.sample_map(ca, geometry.world_to_voxel(caff_a, anchor_w))
            cand_c = geometry.sample_map(co, geometry.world_to_voxel(caff_o, cand_w))
            sim = anchors @ cand.T + anchor_c @ cand_c.T
            idx, ok = mine_hard_negatives(sim, valid, c.hard_pool, c.hard_keep, gen)
        return info_nce(anchors, positives, cand[idx], c.temperature, ok)

    def _legacy_coarse(self, ca, co, caff_a, caff_o, others, gen):  # type: ignore[no-untyped-def]
        c = self.config
        found = self._legacy_anchors(ca, co, caff_a, caff_o, c.coarse_anchors, gen)
        if found is None:
            return None
        pick, anchor_w, anchors, positives = found
        cand = co.flatten(1).T
        cand_w = geometry.world_grid(caff_o, tuple(co.shape[1:])).reshape(-1, 3)
        valid = outside_radius(anchor_w, cand_w, c.coarse_ignore_mm)
        if others and c.coarse_global_negatives > 0:
            pool = torch.cat([o.flatten(1).T for o in others])
            take = torch.randperm(len(pool), generator=gen)[: c.coarse_global_negatives]
            cand = torch.cat([cand, pool[take]])
            valid = torch.cat([valid, valid.new_ones(len(pick), len(take))], dim=1)
        if not valid.any():
            return None
        return info_nce(anchors, positives, cand, c.temperature, valid)


SMALL = {
    "crop_size": 16,
    "embed_dim": 16,
    "fpn_channels": 8,
    "fine_anchors": 48,
    "hard_pool": 40,
    "hard_keep": 8,
    "fine_candidates": 300,  # < the 8^3 fine voxels: a random subset is ranked
    "coarse_anchors": 8,
    "coarse_global_negatives": 24,
}


def _sam_pair(in_channels: int, **params: object) -> tuple[torch.nn.Module, SAM, LegacySAM]:
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec("small_cnn", 3, in_channels, 8, {"channels": [8, 16, 16]}))
    config = SAMConfig(**{**SMALL, **params})
    new = SAM(config, encoder)
    old = LegacySAM(config, encoder)
    old.load_state_dict(new.state_dict())
    return encoder, new, old


def _sam_batch(cache: Path, spec: object, first: int, volumes: int) -> dict:
    c = Cache(cache)
    ds = LocatedViewDataset(c, c.subjects, spec, 100, seed=5)  # type: ignore[arg-type]
    batch = default_collate([ds[first + j] for j in range(volumes)])
    batch["seed"] = batch["seed"].tolist()
    return batch


def _loss_and_grads(obj: SAM, encoder: torch.nn.Module, batch: dict) -> tuple[dict, torch.Tensor]:
    encoder.zero_grad()
    obj.zero_grad()
    out = obj(encoder, batch)
    out["loss"].backward()
    params = [*encoder.parameters(), *obj.parameters()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return out, torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize(
    ("volumes", "params"),
    [(3, {}), (1, {}), (2, {"fine_candidates": 4096, "scale": (0.7, 1.3), "min_overlap": 0.05})],
)
def test_batched_sam_loss_equals_the_per_pair_loop(
    tiny_cache: Path, volumes: int, params: dict
) -> None:
    """Same loss parts (1e-5) and gradients for several batches: one volume (no global
    negatives), all fine voxels as candidates, barely overlapping views."""
    encoder, new, old = _sam_pair(2, **params)
    spec = new.view_spec()
    for first in (0, 7, 21):
        batch = _sam_batch(tiny_cache, spec, first, volumes)
        (o_new, g_new), (o_old, g_old) = (_loss_and_grads(m, encoder, batch) for m in (new, old))
        for key in ("loss", "fine", "coarse", "pairs"):
            assert abs(o_new[key].item() - o_old[key].item()) < 1e-5, (key, first)
        assert o_new["loss"].item() > 0
        # float32 sums in another order: 1e-6 of the largest gradient
        scale = g_old.abs().max().item()
        torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-5 * scale)
    # the random choices come from the batch's seeds: other seeds, another loss
    other = dict(batch, seed=[s + 1 for s in batch["seed"]])
    assert new(encoder, other)["loss"].item() != o_new["loss"].item()


def test_sam_without_any_overlap_has_zero_loss(tiny_cache: Path) -> None:
    encoder, new, old = _sam_pair(2)
    batch = _sam_batch(tiny_cache, new.view_spec(), 0, 2)
    batch["affine"] = batch["affine"].clone()
    batch["affine"][:, 1, :3, 3] += 1000.0  # view 1 far away from view 0
    for obj in (new, old):
        out = obj(encoder, batch)
        assert out["loss"].item() == 0.0 and out["pairs"].item() == 0.0
    out = new(encoder, batch)
    out["loss"].backward()  # a zero in the graph: the training step runs (the old one failed)
    assert all(p.grad is None or not p.grad.any() for p in encoder.parameters())


# -- batched intensity augmentation -------------------------------------------------------


def test_batched_augmentation_computes_what_monai_computes_per_view() -> None:
    """With each range pinned to one value (no noise) the batched changes equal the MONAI
    transforms of ``IntensityAugment.apply``; random ones replay from the batch's seeds."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 2, 6, 6, 6, generator=g) * 3.0 - 0.5
    pinned = IntensityAugment(gamma=(1.3, 1.3), scale=(0.05, 0.05), noise_std=0.0)
    rng = np.random.default_rng(0)
    out = augment_batch({"image": images.clone(), "seed": [4, 5]}, pinned)["image"]
    for i in range(2):
        for v in range(3):
            ref = pinned.apply(images[i, v].numpy(), rng)
            np.testing.assert_allclose(out[i, v].numpy(), ref, rtol=1e-5, atol=1e-5)
    aug = IntensityAugment()
    a = augment_batch({"image": images.clone(), "seed": [4, 5]}, aug)["image"]
    b = augment_batch({"image": images.clone(), "seed": torch.tensor([4, 5])}, aug)["image"]
    c = augment_batch({"image": images.clone(), "seed": [4, 6]}, aug)["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, images) and a.shape == images.shape
    # one draw per view: the views of a batch get different changes
    ratios = (a - images).flatten(2).std(-1)
    assert len({round(float(r), 6) for r in ratios.flatten()}) == 6
    batch = {"image": images.clone(), "seed": [4, 5]}
    assert torch.equal(augment_batch(batch, None)["image"], images)


# -- loader: in process or workers, same batches, exact resume ----------------------------


def _overrides(cache: Path, out: Path, steps: int, **extra: object) -> list[str]:
    """A CPU-sized SAM run (16^3 views, three-level small_cnn), a checkpoint every step."""
    base: dict[str, object] = {
        "data.cache": cache,
        "output": out,
        "data.num_workers": 0,
        "data.samples_per_epoch": 6,
        "objective.name": "sam",
        **{f"objective.{k}": v for k, v in SMALL.items()},
        "model.options": "{channels: [8, 16, 16]}",
        "trainer.max_steps": steps,
        "trainer.batch_size": 2,
        "trainer.checkpoint_every": 1,
        "trainer.log_every": 1,
        "trainer.progress": "false",
        "trainer.seed": 3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items() if v is not None]  # None: leave the key out


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Bit-identical CPU results need the same thread count in every run compared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_auto_keeps_the_faster_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = {0: 10.0, 2: 10.5}
    monkeypatch.setattr(train_module, "loader_rate", lambda ds, bs, workers, n: rates[workers])
    monkeypatch.setattr(train_module, "usable_cpus", lambda: 16)
    assert choose_workers(range(8), 2)["num_workers"] == 0  # within 10%: stay in process
    rates[2] = 12.0
    choice = choose_workers(range(8), 2)
    assert choice["num_workers"] == 2
    assert choice["in_process_batches_per_s"] == 10.0 and choice["workers_batches_per_s"] == 12.0
    rates[1] = 30.0
    assert choose_workers(range(8), 2, busy=15)["num_workers"] == 1  # one core to spare
    # a CPU step that keeps every core busy: no worker is tried, however fast
    assert choose_workers(range(8), 2, busy=16) == {
        "num_workers": 0,
        "in_process_batches_per_s": 10.0,
        "workers_tried": 0,
        "workers_batches_per_s": None,
        "cores": 16,
        "busy_cores": 16,
    }


def test_batches_are_the_same_in_process_and_with_workers_after_a_resume(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """The loader's resume position and every batch (augmentation included) do not depend on
    where the views are cut."""
    cfg = load_config(overrides=_overrides(tiny_cache, tmp_path / "run", 9))
    cache = Cache(tiny_cache)
    spec = PretrainModule(cfg, 2).objective.view_spec()
    state = {"epoch": 1, "batches": 1, "batches_per_epoch": 3, "batch_size": 2}

    def batches(workers: int) -> list[dict]:
        dm = ViewDataModule(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": workers})}),
            cache,
            cache.subjects,
            spec,
        )
        loader = dm.train_dataloader()
        loader.load_state_dict(state)
        out = []
        for b in loader:
            b = dm.on_before_batch_transfer(b, 0)
            out.append(dm.on_after_batch_transfer(b, 0))
        return out

    own, workers = batches(0), batches(1)
    assert len(own) == len(workers) == 2  # batches 2 and 3 of epoch 1
    for a, b in zip(own, workers, strict=True):
        assert a["subject"] == b["subject"] and a["seed"] == b["seed"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["affine"], b["affine"])
    assert own[0]["seed"] != own[1]["seed"]


def test_run_resumed_with_the_other_loader_equals_the_uninterrupted_run(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    full = load_config(overrides=_overrides(tiny_cache, tmp_path / "full", 5))
    pretrain(full)
    original = pretrain_mod.SafetensorsCheckpoint.on_train_batch_end

    class Crash(Exception):
        pass

    def crash_at_4(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        original(self, trainer, module, outputs, batch, batch_idx)
        if trainer.global_step == 4:  # 3 batches per epoch: in the middle of epoch 1
            raise Crash

    monkeypatch.setattr(pretrain_mod.SafetensorsCheckpoint, "on_train_batch_end", crash_at_4)
    with pytest.raises(Crash):
        pretrain(load_config(overrides=_overrides(tiny_cache, tmp_path / "cut", 5)))
    monkeypatch.setattr(pretrain_mod.SafetensorsCheckpoint, "on_train_batch_end", original)
    other = load_config(
        overrides=_overrides(tiny_cache, tmp_path / "cut", 5, **{"data.num_workers": 1})
    )
    assert pretrain(other, resume=True).steps == 5
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_loader_choice_is_recorded_in_run_json(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_config(
        overrides=_overrides(tiny_cache, tmp_path / "run", 1, **{"data.num_workers": "auto"})
    )
    pretrain(cfg)
    loader = json.loads((tmp_path / "run" / "run.json").read_text())["loader"]
    assert loader["num_workers"] in (0, loader["workers_tried"])
    assert loader["in_process_batches_per_s"] > 0


# -- GPU switches, checked on the CPU --------------------------------------------------------


def _isimed(tiny_cache: Path, tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    return load_config(
        overrides=_overrides(
            tiny_cache,
            tmp_path / "run",
            2,
            **{
                **dict.fromkeys((f"objective.{k}" for k in SMALL), None),
                "objective.name": "isimed",
                "objective.crop_size": 8,
                "objective.num_crops": 4,
                **extra,
            },
        )
    )


def test_channels_last_gives_the_same_training_step(tiny_cache: Path, tmp_path: Path) -> None:
    losses = {}
    for cl in (False, True):
        cfg = _isimed(tiny_cache, tmp_path, **{"trainer.channels_last": cl})
        torch.manual_seed(0)
        module = PretrainModule(cfg, 2)
        conv = next(m for m in module.encoder.modules() if isinstance(m, torch.nn.Conv3d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) == cl
        cache = Cache(tiny_cache)
        dm = ViewDataModule(cfg, cache, cache.subjects, module.objective.view_spec())
        batch = next(iter(dm.train_dataloader()))
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        out = []
        for _ in range(2):  # the loss of a step, and of the step after an update
            loss = module.objective(module.encoder, batch)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        losses[cl] = out
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_bf16_mixed_trains_on_the_cpu(tiny_cache: Path, tmp_path: Path) -> None:
    """``pretrain`` with bf16 autocast (and channels-last) on the CPU: finite losses."""
    switches = {"trainer.precision": "bf16-mixed", "trainer.channels_last": "true"}
    cfg = _isimed(tiny_cache, tmp_path, **switches)
    assert pretrain(cfg).steps == 2
    rows = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [
        float(r.split(",")[header.index("loss")])
        for r in rows[1:]
        if r.split(",")[header.index("loss")]
    ]
    assert losses and all(np.isfinite(losses))


def test_progress_bar_describes_epochs_by_steps() -> None:
    """A max_steps run has max_epochs=-1; Lightning's bar printed "Epoch 11/-2"."""
    from types import SimpleNamespace

    bar = pretrain_mod.StepProgressBar()
    bar._trainer = SimpleNamespace(
        global_step=550, max_steps=600, max_epochs=-1, num_training_batches=50
    )
    assert bar._get_train_description(11) == "Epoch 11 (steps 551-600 of 600)"
    bar._trainer = SimpleNamespace(
        global_step=580, max_steps=600, max_epochs=-1, num_training_batches=50
    )
    assert bar._get_train_description(11) == "Epoch 11 (steps 581-600 of 600)"


def test_bf16_convolutions_of_two_voxel_maps_give_finite_gradients() -> None:
    """torch 2.13's oneDNN bf16 convolution gives NaN weight gradients at random for maps with
    a side of 2 voxels (measured: about one backward in three for this shape); the guard runs
    those in float32 and leaves larger maps in bf16."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(32, 32, 3, padding=1))
    assert train_module.guard_small_bf16_convs(net) == 1
    conv = net[0]
    for _ in range(40):
        conv.zero_grad()
        x = torch.randn(4, 32, 2, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
            assert y.dtype == torch.float32  # the guarded path
            assert torch.is_autocast_enabled("cpu")  # and autocast is back on after it
        y.backward(torch.randn_like(y))
        assert torch.isfinite(conv.weight.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.randn(1, 32, 4, 4, 4)).dtype == torch.bfloat16  # larger maps: bf16


@pytest.mark.skipif(
    os.environ.get("ANATOMAP_TEST_COMPILE") != "1",
    reason="torch.compile of a 2-level small_cnn took 27 s forward + 13 s backward on 2 shared "
    "CPU cores (measured for issue 18), not a few seconds; ANATOMAP_TEST_COMPILE=1 runs it",
)
def test_compiled_encoder_gives_the_same_loss(tiny_cache: Path, tmp_path: Path) -> None:
    losses = []
    for compiled in (False, True):
        cfg = _isimed(tiny_cache, tmp_path, **{"trainer.compile": compiled})
        torch.manual_seed(0)
        module = PretrainModule(cfg, 2)
        cache = Cache(tiny_cache)
        dm = ViewDataModule(cfg, cache, cache.subjects, module.objective.view_spec())
        batch = next(iter(dm.train_dataloader()))
        loss = module.objective(module.encoder, batch)["loss"]
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_config_accepts_auto_workers_and_names_bad_values(tmp_path: Path) -> None:
    from anatomap.errors import ConfigError

    cfg = load_config(overrides=["data.cache=c", "data.num_workers=auto"])
    assert cfg.data.num_workers == "auto"
    for bad in ("data.num_workers=-1", "data.num_workers=fast", "trainer.precision=fp8"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(overrides=["data.cache=c", bad])
