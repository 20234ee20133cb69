"""Checkpoint metadata: the SHA-256 is always required and checked, and every size the
metadata gives is checked against the weights (on the meta device) before anything is
allocated. Property-based: random edits of meta.json load or fail with one clean line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anatomap import limits
from anatomap.checkpoint import load_checkpoint, load_model, save_checkpoint
from anatomap.errors import CheckpointError
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config

SPEC = EncoderSpec("small_cnn", 3, 1, 16, {"channels": [4, 8, 8]})
SAM = {"embed_dim": 8, "fpn_channels": 8, "crop_size": 16}


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder(SPEC)
    objective = get_objective("sam")(objective_config({"name": "sam", **SAM}), encoder)
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    meta = {"objective": "sam", "objective_config": SAM, "step": 1}
    return save_checkpoint(folder, encoder, objective, meta)


def edited(src: Path, dest: Path, edit: Any) -> Path:
    """A copy of checkpoint ``src`` whose meta.json went through ``edit(meta)``."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    meta = json.loads((src / "meta.json").read_text())
    edit(meta)
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def _drop_sha(meta: dict) -> None:
    meta.pop("weights_sha256")


def test_the_sha256_is_always_written(sam_checkpoint: Path) -> None:
    meta = json.loads((sam_checkpoint / "meta.json").read_text())
    assert len(meta["weights_sha256"]) == 64


def test_a_checkpoint_without_sha256_is_refused_with_a_clear_line(
    sam_checkpoint: Path, tmp_path: Path
) -> None:
    folder = edited(sam_checkpoint, tmp_path / "c", _drop_sha)
    with pytest.raises(CheckpointError, match=r"no valid weights_sha256.*not loaded") as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value)


def test_a_bit_flipped_file_without_sha256_does_not_load(
    sam_checkpoint: Path, tmp_path: Path
) -> None:
    folder = edited(sam_checkpoint, tmp_path / "c", _drop_sha)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_checkpoint(folder)


@pytest.mark.parametrize("sha", [None, "", "abc", 12, "g" * 64, "A" * 64, ["0" * 64]])
def test_a_malformed_sha256_is_refused(sam_checkpoint: Path, tmp_path: Path, sha: Any) -> None:
    folder = edited(sam_checkpoint, tmp_path / "c", lambda m: m.update(weights_sha256=sha))
    with pytest.raises(CheckpointError, match="no valid weights_sha256"):
        load_checkpoint(folder)


BOMBS = {
    "embed_dim": lambda m: m["encoder"].update(embed_dim=10**9),
    "channels": lambda m: m["encoder"]["options"].update(channels=[4, 10**6, 8]),
    "in_channels": lambda m: m["encoder"].update(in_channels=10**7),
    "long_list": lambda m: m["encoder"]["options"].update(channels=list(range(1, 10**5))),
    "objective_embed_dim": lambda m: m["objective_config"].update(embed_dim=10**8),
    "objective_fpn": lambda m: m["objective_config"].update(fpn_channels=10**7),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_metadata_sizes_are_checked_before_any_allocation(
    sam_checkpoint: Path, tmp_path: Path, case: str
) -> None:
    folder = edited(sam_checkpoint, tmp_path / "c", BOMBS[case])
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    assert time.perf_counter() - start < 20
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg
    assert any(w in msg for w in ("do not match", "lists", "does not hold", "larger than")), msg


def test_non_finite_numbers_in_metadata_are_refused(sam_checkpoint: Path, tmp_path: Path) -> None:
    folder = edited(
        sam_checkpoint, tmp_path / "c", lambda m: m["objective_config"].update(temperature=1e999)
    )
    with pytest.raises(CheckpointError, match=r"objective_config\.temperature' is not a finite"):
        load_checkpoint(folder)


def test_oversized_and_deeply_nested_meta_json(
    sam_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = edited(sam_checkpoint, tmp_path / "c", lambda m: None)
    text = (folder / "meta.json").read_text()
    (folder / "meta.json").write_text(
        text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    with pytest.raises(CheckpointError, match="not valid JSON \\(nested too deeply\\)"):
        load_checkpoint(folder)
    (folder / "meta.json").write_text(text)
    monkeypatch.setattr(limits, "MAX_META_BYTES", len(text) - 1)
    with pytest.raises(CheckpointError, match=r"more than the .* checkpoint metadata may take"):
        load_checkpoint(folder)


def test_the_untouched_checkpoint_still_loads(sam_checkpoint: Path) -> None:
    _, objective, meta = load_model(sam_checkpoint)
    assert meta["objective"] == "sam" and sum(p.numel() for p in objective.parameters()) > 0


KEYS = [
    ("encoder", "embed_dim"),
    ("encoder", "in_channels"),
    ("encoder", "spatial_dims"),
    ("encoder", "name"),
    ("encoder", "options"),
    ("objective_config", "embed_dim"),
    ("objective_config", "fpn_channels"),
    ("objective_config", "fine_level"),
    ("objective_config", "temperature"),
    (None, "format_version"),
    (None, "objective"),
    (None, "encoder"),
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.sampled_from([0, 1, 2, 3, 7, 8, 16, 10**6, 10**9, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-4, 10**6), max_size=5),
    st.dictionaries(st.sampled_from(["channels", "x", "modality_fusion"]), st.integers(-2, 64)),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_random_metadata_loads_or_fails_cleanly(
    sam_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, edits: list
) -> None:
    def edit(meta: dict) -> None:
        for (section, key), value in edits:
            target = meta if section is None else meta.setdefault(section, {})
            if isinstance(target, dict):
                target[key] = value

    folder = edited(sam_checkpoint, tmp_path_factory.mktemp("h") / "c", edit)
    start = time.perf_counter()
    try:
        load_model(folder)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    assert time.perf_counter() - start < 20
