"""Issue 16 for ``evaluate`` and ``mine``: ``device`` reaches every network (CPU results are
unchanged), an unavailable device is one error line before any work, and progress is a tqdm
bar on stderr that ``--quiet`` / ``progress=False`` turns off."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from anatomap import geometry
from anatomap.checkpoint import load_checkpoint, load_objective, save_checkpoint
from anatomap.cli import main
from anatomap.data.cache import Cache
from anatomap.data.pairs import MiningRequest
from anatomap.errors import AnatomapError
from anatomap.eval import figures, matchers, segmentation, tasks
from anatomap.eval.evaluate import evaluate
from anatomap.eval.landmarks import evaluate_matchers
from anatomap.eval.matchers import build_matchers
from anatomap.eval.position import position_task
from anatomap.eval.robustness import robustness_task
from anatomap.eval.segmentation import segmentation_task
from anatomap.eval.tasks import EvalContext
from anatomap.infer import mining
from anatomap.infer.device import resolve_device
from anatomap.infer.mining import mine_pairs, pairs_for
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config

HELDOUT = ["sub-04", "sub-05"]
TRAIN = ["sub-00", "sub-01", "sub-02", "sub-03"]
SMALL = {
    "crops_per_subject": 6,
    "embedding_maps": False,
    "registration": False,
    "max_points": 4,
    "seg_steps": 2,
    "seg_crop": 16,
    "seg_batch": 2,
    "seg_subjects": [1],
}
AUTO_IS_CPU = resolve_device("auto").type == "cpu"
UNAVAILABLE = "cuda:7"  # no GPU here; a GPU machine with fewer than 8 refuses it too


def _checkpoint(folder: Path, cache: Path, method: str, params: dict[str, Any]) -> Path:
    torch.manual_seed(0)
    c = Cache(cache)
    spec = EncoderSpec("small_cnn", 3, len(c.modalities), 16, {"channels": [8, 16, 32]})
    enc = build_encoder(spec)
    cfg = objective_config({"name": method, **params})
    obj = get_objective(method)(cfg, enc)
    meta = {
        "objective": method,
        "objective_config": cfg.model_dump(mode="json", exclude={"name"}),
        "data": {
            "cache": str(cache),
            "heldout_subjects": HELDOUT,
            "train_subjects": TRAIN,
            "spacing": c.spacing,
            "modalities": c.modalities,
        },
        "step": 0,
    }
    return save_checkpoint(folder, enc, obj, meta)


@pytest.fixture(scope="module")
def landmark_cache(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny cache with five landmarks per subject (around its centre)."""
    root = tmp_path_factory.mktemp("marks") / "cache"
    shutil.copytree(tiny_cache, root)
    offsets = np.array([[0, 0, 0], [6, 0, 0], [0, 6, 0], [0, 0, 6], [-6, 4, 2]], float)
    cache = Cache(root)
    for sid in cache.subjects:
        subj = cache[sid]
        centre = geometry.box_center(subj.affine, subj.shape)
        meta = json.loads((subj.root / "meta.json").read_text())
        meta["landmarks"] = {f"lm{k}": (centre + o).tolist() for k, o in enumerate(offsets)}
        (subj.root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def isimed(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("isimed") / "checkpoint"
    return _checkpoint(folder, tiny_cache, "isimed", {"crop_size": 16, "num_crops": 4})


@pytest.fixture(scope="module")
def sam(landmark_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = {"embed_dim": 8, "fpn_channels": 8, "crop_size": 16}
    return _checkpoint(tmp_path_factory.mktemp("sam") / "checkpoint", landmark_cache, "sam", params)


def _same(a: Any, b: Any) -> None:
    """Equal metrics, NaN equal to NaN, timings left out."""
    if isinstance(a, dict):
        keys = {k for k in a if k not in ("timing", "seconds")}
        assert keys == {k for k in b if k not in ("timing", "seconds")}
        for k in keys:
            _same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float):
        assert a == b or (np.isnan(a) and np.isnan(b)), (a, b)
    else:
        assert a == b


# ------------------------------------------------------------------------------- evaluate


def _context(ckpt_path: Path, **options: Any) -> EvalContext:
    ckpt = load_checkpoint(ckpt_path)
    cache = Cache(ckpt.meta["data"]["cache"])
    return EvalContext(ckpt, load_objective(ckpt), cache, HELDOUT, 0, {**SMALL, **options})


def _landmarks(ctx: EvalContext) -> dict[str, Any]:
    """The landmark task's metrics (the dense matchers), without its figures."""
    report = evaluate_matchers(build_matchers(ctx), ctx.cache, ctx.subjects, max_points=4)
    return report.metrics()


# the functions through which each task runs a network, and so must be given the device
SPIED = {
    "position": [(tasks, "embedder"), (figures, "slice_features")],
    "robustness": [(tasks, "embedder")],
    "segmentation": [(segmentation, "finetune"), (segmentation, "predict")],
    "landmarks": [(matchers, "embed_array"), (matchers, "match_points")],
}


@pytest.mark.skipif(not AUTO_IS_CPU, reason="the default device is a GPU here")
@pytest.mark.parametrize(
    ("which", "task", "name"),
    [
        ("isimed", position_task, "position"),
        ("isimed", robustness_task, "robustness"),
        ("isimed", segmentation_task, "segmentation"),
        ("sam", _landmarks, "landmarks"),
    ],
    ids=list(SPIED),
)
def test_tasks_on_the_cpu_give_the_default_metrics(
    which: str,
    task: Callable[[EvalContext], Any],
    name: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = request.getfixturevalue(which)
    default = task(_context(ckpt, embedding_maps=True))
    seen: dict[str, list[Any]] = {}
    for module, fn in SPIED[name]:
        real = getattr(module, fn)

        def spy(*a: Any, _real: Any = real, _fn: str = fn, **kw: Any) -> Any:
            seen.setdefault(_fn, []).append(kw.get("device"))
            return _real(*a, **kw)

        monkeypatch.setattr(module, fn, spy)
    cpu = task(_context(ckpt, device="cpu", embedding_maps=True))
    # every network of the task ran on the context's (resolved) device
    assert set(seen) == {fn for _, fn in SPIED[name]}
    assert all(d == torch.device("cpu") for calls in seen.values() for d in calls), seen
    if not isinstance(default, dict):
        default, cpu = default.metrics, cpu.metrics
    _same(default, cpu)
    if which == "sam":  # the dense matcher ran, on both rows
        assert set(cpu["matchers"]) == {"sam (pretrained)", "random init"}
        assert all(r["overall"]["n_points"] > 0 for r in cpu["matchers"].values())


@pytest.mark.skipif(not AUTO_IS_CPU, reason="the default device is a GPU here")
def test_evaluate_on_the_cpu_gives_the_default_metrics(isimed: Path, tmp_path: Path) -> None:
    kw = {"tasks": ["health"], "progress": False, **SMALL}
    default = evaluate(isimed, out=tmp_path / "a", **kw).metrics
    cpu = evaluate(isimed, out=tmp_path / "b", device="cpu", **kw).metrics
    assert "health" in cpu
    _same(default, cpu)


def test_the_context_resolves_the_device_once_and_embeds_back_to_the_cpu(isimed: Path) -> None:
    ckpt = load_checkpoint(isimed)
    ctx = EvalContext(ckpt, load_objective(ckpt), Cache(ckpt.meta["data"]["cache"]), HELDOUT)
    assert ctx.device == resolve_device("auto") and ctx.precision == "auto" and not ctx.progress
    ctx = EvalContext(ctx.ckpt, ctx.objective, ctx.cache, HELDOUT, 0, {"device": "cpu"})
    assert ctx.device == torch.device("cpu")
    out = ctx.embedder(ctx.encoder, ctx.objective)(torch.rand(3, 2, 16, 16, 16))
    assert out.device.type == "cpu" and out.dtype == torch.float32 and out.shape[0] == 3
    bad = EvalContext(ctx.ckpt, ctx.objective, ctx.cache, HELDOUT, 0, {"device": "tpu"})
    with pytest.raises(AnatomapError, match="device 'tpu'"):
        bad.device  # noqa: B018


def test_an_unavailable_device_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    with pytest.raises(AnatomapError, match=f"device '{UNAVAILABLE}'"):
        evaluate(tmp_path / "no-such-run", device=UNAVAILABLE)
    with pytest.raises(AnatomapError, match="precision 'fp8'"):
        evaluate(tmp_path / "no-such-run", device="cpu", precision="fp8")


@pytest.mark.parametrize("command", ["evaluate", "mine"])
def test_an_unavailable_device_is_one_cli_error_line(
    command: str, isimed: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    target = str(isimed) if command == "evaluate" else "alice"
    assert main([command, target, "--device", UNAVAILABLE]) == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("anatomap: error: ") and f"device '{UNAVAILABLE}'" in lines[0]


def _cli_evaluate(ckpt: Path, out: Path, *extra: str) -> list[str]:
    argv = ["evaluate", str(ckpt), "--tasks", "health", "--crops", "6", "--out", str(out)]
    return [*argv, "--device", "cpu", *extra]


def test_evaluate_progress_is_on_stderr_and_quiet_turns_it_off(
    isimed: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(_cli_evaluate(isimed, tmp_path / "loud")) == 0
    out, err = capfd.readouterr()
    assert "evaluate:" in err and "1/1" in err and "health" in err  # the bar over tasks
    assert "evaluate:" not in out and "report:" in out
    assert main(_cli_evaluate(isimed, tmp_path / "quiet", "--quiet")) == 0
    out, err = capfd.readouterr()
    assert "evaluate:" not in err and "%|" not in err and "\r" not in err, err
    assert "report:" in out


# --------------------------------------------------------------------------------- mining


def _mine(cache: Path, sam_ckpt: Path, out: Path, **kw: Any) -> str:
    c = Cache(cache)
    opts = {"pairs_per_subject": 2, "threshold": -1.0, "max_tries": 5, "window": 16}
    mine_pairs(c, c.subjects[:3], sam_ckpt, out, **opts, **kw)
    return (out / "pairs.csv").read_text()


@pytest.mark.skipif(not AUTO_IS_CPU, reason="the default device is a GPU here")
def test_mining_on_the_cpu_gives_the_default_pairs(
    landmark_cache: Path, sam: Path, tmp_path: Path
) -> None:
    default = _mine(landmark_cache, sam, tmp_path / "a")
    cpu = _mine(landmark_cache, sam, tmp_path / "b", device="cpu")
    assert default == cpu and len(cpu.splitlines()) == 1 + 3 * 2


def test_pairs_for_hands_the_device_to_embedding_and_matching(
    landmark_cache: Path, sam: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, list[Any]] = {"embed": [], "match": []}
    embed, match = mining.embed_array, mining.match_points

    def spy_embed(*a: Any, **kw: Any) -> Any:
        seen["embed"].append(kw.get("device"))
        return embed(*a, **kw)

    def spy_match(*a: Any, **kw: Any) -> Any:
        seen["match"].append(kw.get("device"))
        return match(*a, **kw)

    monkeypatch.setattr(mining, "embed_array", spy_embed)
    monkeypatch.setattr(mining, "match_points", spy_match)
    c = Cache(landmark_cache)
    request = MiningRequest(sam, tmp_path / "m", 1, threshold=-1.0, max_tries=3, window=16)
    mined = pairs_for(request, c, c.subjects[:3], 0, progress=False, device="cpu")
    assert mined is not None and len(mined) == 3
    assert seen["embed"] == [torch.device("cpu")] * 3
    assert seen["match"] and set(seen["match"]) == {torch.device("cpu")}
    with pytest.raises(AnatomapError, match=f"device '{UNAVAILABLE}'"):
        pairs_for(request, c, c.subjects[:3], 0, progress=False, device=UNAVAILABLE)


def test_mining_progress_is_a_bar_on_stderr(
    landmark_cache: Path, sam: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _mine(landmark_cache, sam, tmp_path / "loud", device="cpu", progress=True)
    out, err = capfd.readouterr()
    assert "mining:" in err and "3/3" in err and "mining" not in out
    _mine(landmark_cache, sam, tmp_path / "quiet", device="cpu", progress=False)
    out, err = capfd.readouterr()
    assert "mining" not in err and "%|" not in err


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluate_on_a_gpu_runs_every_network_there(
    sam: Path, isimed: Path, tmp_path: Path
) -> None:
    kw = {"registration": False, "progress": False, **SMALL}
    tasks = ["position", "health", "segmentation"]
    gpu = evaluate(isimed, out=tmp_path / "g", device="cuda", tasks=tasks, **kw).metrics
    cpu = evaluate(isimed, out=tmp_path / "c", device="cpu", tasks=tasks, **kw).metrics
    for name, m in gpu["position"]["encoders"].items():  # bf16 autocast: close, not equal
        assert m["mean_error_mm"] == pytest.approx(
            cpu["position"]["encoders"][name]["mean_error_mm"], rel=0.2, abs=2.0
        )
    marks = evaluate(sam, out=tmp_path / "s", device="cuda", tasks=["landmarks"], **kw).metrics
    for row in marks["landmarks"]["matchers"].values():
        assert row["failed_pairs"] == 0 and np.isfinite(row["overall"]["mre_mm"])
