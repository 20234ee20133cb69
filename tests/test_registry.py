"""The generic registry helper and the three registries built on it."""

from __future__ import annotations

import pytest

from anatomap.errors import ConfigError
from anatomap.registry import Registry


def test_register_get_and_duplicates() -> None:
    reg: Registry[int] = Registry("widget")

    @reg.register("one")
    def one() -> int:
        return 1

    assert reg.get("one") is one and "one" in reg and len(reg) == 1
    with pytest.raises(ValueError, match="widget 'one' registered twice"):
        reg.register("one")(lambda: 2)
    assert reg.get("one") is one  # the first registration stays


def test_unknown_name_lists_the_registered_ones() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("b", 2)
    reg.add("a", 1)
    with pytest.raises(ConfigError, match=r"unknown widget 'c'; registered: a, b"):
        reg.get("c")


def test_filter_and_order() -> None:
    reg: Registry[int] = Registry("widget")
    for i, name in enumerate(["swin_b", "resnet", "swin_a", "unet"]):
        reg.add(name, i)
    assert reg.names() == ["resnet", "swin_a", "swin_b", "unet"]
    assert reg.names("swin*") == ["swin_a", "swin_b"]
    assert reg.names("*n*t") == ["resnet", "unet"]
    assert reg.names("nothing*") == []
    assert [n for n, _ in reg.items()] == ["swin_b", "resnet", "swin_a", "unet"]


def test_builtins_load_once_before_the_first_lookup() -> None:
    calls: list[int] = []
    reg: Registry[str] = Registry("widget", builtins=lambda: (calls.append(1), reg.add("x", "X")))
    assert calls == []
    assert reg.get("x") == "X"
    assert reg.names() == ["x"] and calls == [1]


def test_failed_builtins_are_retried() -> None:
    state = {"fail": True}

    def load() -> None:
        if state["fail"]:
            raise ImportError("not yet")
        reg.add("x", 1)

    reg: Registry[int] = Registry("widget", builtins=load)
    with pytest.raises(ImportError):
        reg.names()
    state["fail"] = False
    assert reg.names() == ["x"]


def test_pop_unregisters() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("tmp", 1)
    assert reg.pop("tmp") == 1 and reg.pop("tmp") is None
    reg.add("tmp", 2)  # free again
    assert reg.get("tmp") == 2


def test_the_three_registries_use_the_helper() -> None:
    from anatomap.eval.tasks import TASKS, get_task, list_tasks, register_task
    from anatomap.models.encoders import ENCODERS, EncoderSpec, build_encoder, list_encoders
    from anatomap.objectives.registry import OBJECTIVES, get_objective, list_objectives

    for reg in (ENCODERS, OBJECTIVES, TASKS):
        assert isinstance(reg, Registry)
    assert list_encoders() == ENCODERS.names() and "small_cnn" in list_encoders()
    assert list_encoders("swin*") == ["swinunetr"]
    assert list_objectives() == OBJECTIVES.names() and "isimed" in list_objectives()
    assert list_objectives("s*") == [n for n in list_objectives() if n.startswith("s")]
    assert get_objective("sam").name == "sam"
    assert set(list_tasks()) == set(TASKS.names()) and "position" in list_tasks()
    assert list_tasks(filter="pos*") == ["position"]
    assert "segmentation" not in list_tasks(default_only=True)
    with pytest.raises(ConfigError, match="unknown objective 'nope'; registered: alice"):
        get_objective("nope")
    with pytest.raises(ConfigError, match="unknown evaluation task 'nope'"):
        get_task("nope")
    with pytest.raises(ConfigError, match="unknown encoder 'nope'; registered: resnet"):
        build_encoder(EncoderSpec("nope", 3, 1, 8))
    with pytest.raises(ValueError, match="evaluation task 'position' registered twice"):
        register_task("position")(lambda ctx: None)  # was silently overwritten before
    assert get_task("position").fn.__module__ == "anatomap.eval.position"
