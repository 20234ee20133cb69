"""Killed runs resume exactly: sample order, optimiser, scheduler, EMA and RNG state.

The slow test kills ``anatomap pretrain`` with SIGKILL at random points, resumes it each
time with ``--resume`` and checks that the final weights equal, bit for bit, those of an
uninterrupted run with the same seed (CPU, one thread).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, DistributedSampler

from anatomap.checkpoint import load_checkpoint
from anatomap.config import dump_config, load_config
from anatomap.data.sampler import EpochSampler
from anatomap.train import pretrain as pretrain_mod
from anatomap.train.module import ResumableLoader, rng_state, set_rng_state
from anatomap.train.pretrain import pretrain
from anatomap.train.resume import load_resume_file


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max(((a[k] - b[k]).abs().max().item() for k in different), default=0.0)
    assert not different, f"{len(different)} tensors differ (max abs diff {worst:.3g})"


# --------------------------------------------------------------------------------------------
# units: sampler, loader state, RNG state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 6, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_shards_like_distributed_sampler(n: int, world: int) -> None:
    for rank in range(world):
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        ours = EpochSampler(n, rank, world)
        ours.set_epoch(2)
        assert list(ours) == [2 * n + i for i in ref]
        assert len(ours) == len(ref)


def test_epoch_sampler_resume_skips_consumed_indices_once() -> None:
    s = EpochSampler(10)
    s.resume(3, 4)
    assert list(s) == list(range(34, 40))
    assert list(s) == list(range(30, 40))  # the skip applies to one iteration only
    s.resume(3, 4)
    s.set_epoch(4)  # Lightning moved on to another epoch: nothing is skipped there
    assert list(s) == list(range(40, 50))


class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_loader_state_resumes_after_the_consumed_batches() -> None:
    steps = {"done": 5}  # the trainer's optimiser steps (restored with the resume file)

    def loader() -> ResumableLoader:
        return ResumableLoader(
            _Indices(6), steps_done=lambda: steps["done"], batch_size=2, sampler=EpochSampler(6)
        )

    state = loader().state_dict()  # 5 steps of 3 per epoch: epoch 1, 2 batches done
    assert state == {"epoch": 1, "batches": 2, "batches_per_epoch": 3, "batch_size": 2}
    fresh = loader()
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == [[10, 11]]
    steps["done"] = 6
    fresh.sampler.set_epoch(1)  # a lagging epoch from Lightning's loop: the steps decide
    assert [b.tolist() for b in fresh] == [[12, 13], [14, 15], [16, 17]]
    changed = ResumableLoader(
        _Indices(6), steps_done=lambda: 0, batch_size=3, sampler=EpochSampler(6)
    )
    with pytest.warns(UserWarning, match="batch size or samples per epoch changed"):
        changed.load_state_dict(state)
    assert [b.tolist() for b in changed] == [[6, 7, 8], [9, 10, 11]]


def test_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    import random as pyrandom

    import numpy as np

    torch.manual_seed(1)
    np.random.seed(2)
    pyrandom.seed(3)
    path = tmp_path / "rng.ckpt"
    torch.save({"rng": rng_state()}, path)
    expected = (torch.rand(3), np.random.rand(3), [pyrandom.random() for _ in range(3)])
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), [pyrandom.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2]


# --------------------------------------------------------------------------------------------
# a crash mid-epoch (in-process), Spatial-Aware: EMA encoder + sampled routes (global RNG)
# --------------------------------------------------------------------------------------------


class _Crash(Exception):
    pass


def test_crash_mid_epoch_then_resume_equals_uninterrupted_run_with_ema(
    overrides: Callable[..., list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    extra = {
        "objective.name": "spatial_aware",
        "objective.num_crops": None,
        "objective.num_views": 4,
        "objective.crop_size": 8,
        "objective.head_hidden": 16,
        "objective.route_enumerate_max": 3,  # 4 views > 3: routes drawn from torch's RNG
        "objective.num_routes": 4,
    }
    full = load_config(overrides=overrides(tmp_path / "full", 7, **extra))
    pretrain(full)

    original = pretrain_mod.SafetensorsCheckpoint.on_train_batch_end

    def crash_at_4(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        original(self, trainer, module, outputs, batch, batch_idx)
        if trainer.global_step == 4:  # 3 batches per epoch: in the middle of epoch 1
            raise _Crash

    cut = load_config(overrides=overrides(tmp_path / "cut", 7, **extra))
    monkeypatch.setattr(pretrain_mod.SafetensorsCheckpoint, "on_train_batch_end", crash_at_4)
    with pytest.raises(_Crash):
        pretrain(cut)
    monkeypatch.setattr(pretrain_mod.SafetensorsCheckpoint, "on_train_batch_end", original)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "meta.json").read_text())["step"] == 4
    resumed = pretrain(cut, resume=True)
    assert resumed.steps == 7
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert any(k.startswith("objective.ema.") for k in a)  # the EMA encoder is saved
    assert_same_weights(a, b)


def test_resumed_run_resumed_again_at_epoch_boundaries_equals_uninterrupted_run(
    overrides: Callable[..., list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    """Crash right after the resume file of step 6, resume, crash after step 9, resume to 12:
    the same weights as one run (3 batches per epoch, so every resume starts an epoch; the
    second resume file is written by a resumed process). The kill -9 test below found this:
    the data of step 9 onwards came from the wrong epoch."""
    pretrain(load_config(overrides=overrides(tmp_path / "full", 12)))
    original = pretrain_mod.SafetensorsCheckpoint.on_train_batch_end

    def crash_after(step: int):  # type: ignore[no-untyped-def]
        def hook(self, trainer, module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            original(self, trainer, module, outputs, batch, batch_idx)
            if trainer.global_step == step + 1:  # the resume file still holds `step`
                raise _Crash

        return hook

    cut = load_config(overrides=overrides(tmp_path / "cut", 12))
    for step, resume in ((6, False), (9, True)):
        monkeypatch.setattr(
            pretrain_mod.SafetensorsCheckpoint, "on_train_batch_end", crash_after(step)
        )
        with pytest.raises(_Crash):
            pretrain(cut, resume=resume)
        last = load_resume_file(tmp_path / "cut" / "lightning" / "last.ckpt")
        assert int(last["global_step"]) == step
    monkeypatch.setattr(pretrain_mod.SafetensorsCheckpoint, "on_train_batch_end", original)
    assert pretrain(cut, resume=True).steps == 12
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    # the training log keeps every run's rows (Lightning's CSV logger deleted the old ones)
    rows = list(csv.DictReader((tmp_path / "cut" / "logs" / "metrics.csv").open()))
    logged = sorted(int(r["step"]) for r in rows if r.get("loss"))
    assert set(logged) == set(range(12))


# --------------------------------------------------------------------------------------------
# kill -9 at random points, through the CLI
# --------------------------------------------------------------------------------------------

MAX_STEPS = 15
KILLS = 3


def _cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "anatomap.cli", "pretrain", str(config), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _step(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoint" / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_equals_uninterrupted_run(
    overrides: Callable[..., list[str]], tmp_path: Path, one_thread: None
) -> None:
    rng = random.Random(9)
    config = tmp_path / "killed.yaml"
    config.write_text(dump_config(load_config(overrides=overrides(tmp_path / "killed", MAX_STEPS))))
    run = tmp_path / "killed"
    last = run / "lightning" / "last.ckpt"
    log_path = tmp_path / "killed.log"
    survived, target = 0, 0
    with open(log_path, "wb") as log:
        for _ in range(KILLS):
            target = min(MAX_STEPS - 2, target + rng.randint(2, 5))
            args = _cli(config, *(["--resume"] if last.exists() else []))
            proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=log, stderr=log)
            deadline = time.monotonic() + 120
            while _step(run) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))  # anywhere: mid-step, mid-write, between writes
            assert proc.poll() is None, log_path.read_text()[-2000:]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # never half-written: the checkpoint and the resume file both load
            assert load_checkpoint(run).meta["step"] >= 1
            assert int(load_resume_file(last)["global_step"]) >= 1
            survived += 1
            target = _step(run)
    final = subprocess.run(
        _cli(config, "--resume"), cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"trained {MAX_STEPS} steps" in final.stdout
    assert survived == KILLS
    assert not list(run.glob(".checkpoint.*")) and not list(run.glob("lightning/.*tmp*"))
    # the uninterrupted run, through the CLI like the killed ones (a fresh process, so no state
    # left by other tests in this one can make the two differ)
    straight = tmp_path / "straight.yaml"
    straight.write_text(
        dump_config(load_config(overrides=overrides(tmp_path / "straight", MAX_STEPS)))
    )
    done = subprocess.run(_cli(straight), cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "straight"), weights(run))
