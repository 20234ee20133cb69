"""Configs: typed, strict, overridable, and never executing anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from anatomap.api import config_path, load_config
from anatomap.config import load_config as load_file
from anatomap.errors import ConfigError


def test_packaged_configs_validate() -> None:
    for name in ("isimed", "demo"):
        cfg = load_config(name, ["data.cache=somewhere"])
        assert cfg.objective.name == "isimed"
        assert cfg.data.cache == "somewhere"


def test_overrides_are_typed() -> None:
    cfg = load_config("isimed", ["trainer.lr=3e-4", "objective.num_crops=8", "data.heldout=[a,b]"])
    assert cfg.trainer.lr == pytest.approx(3e-4)
    assert cfg.data.heldout == ["a", "b"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.lrr=1", "unknown key 'trainer.lrr'"),
        ("trainer.batch_size=four", "trainer.batch_size"),
        ("trainer.batch_size=-4", "trainer.batch_size"),
        ("objective.crop_size=-1", "objective.crop_size"),
        ("objective.bogus=1", "unknown key 'objective.bogus'"),
        ("objective.name=nope", "unknown objective 'nope'"),
        ("model.spatial_dims=4", "model.spatial_dims"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("'", "'")):
        load_config("isimed", [override])


def test_yaml_cannot_execute_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "data:\n  cache: !!python/object/apply:os.system ['touch " + str(marker) + "']\n"
    )
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_file(bad)
    assert not marker.exists()


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found|no such config"):
        config_path(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        config_path("typo/isimed.yaml")  # never falls back to the packaged file
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_file(f)
    with pytest.raises(ConfigError, match="key=value"):
        load_config("isimed", ["trainer.lr"])
