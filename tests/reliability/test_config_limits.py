"""Configs: YAML size, depth and alias limits (a 640-byte alias bomb is refused at once), and
finite numbers wherever a config expects a number. Property-based: random YAML documents and
random values for numeric keys give a valid config or one ConfigError per problem."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from anatomap import limits
from anatomap.config import load_config, parse_overrides, read_yaml
from anatomap.errors import ConfigError

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def billion_laughs(levels: int = 9) -> str:
    """~640 bytes that expand to 9^levels strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


def test_a_640_byte_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    text = billion_laughs()
    assert len(text) < 700
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="once its aliases are expanded") as info:
        load_config(path)
    assert time.perf_counter() - start < 2
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    flow = "{a: &a [x,x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
    flow += "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
    flow += "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}"
    with pytest.raises(ConfigError, match=r"override 'model.options=.*aliases are expanded"):
        parse_overrides([f"model.options={flow}"])


def test_moderate_aliases_are_still_fine(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("data: &b {cache: c, samples_per_epoch: 8}\nmodel: {options: {copy: *b}}\n")
    assert load_config(path).data.samples_per_epoch == 8


@pytest.mark.parametrize(
    "text, reason",
    [
        ("a: &a [*a]\n", "recursive alias"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
        ("a: " + "{b: " * 100 + "1" + "}" * 100 + "\n", "nested deeper than"),
    ],
    ids=["recursive", "deep-flow", "deep-mappings"],
)
def test_recursive_and_deep_yaml_is_refused(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        read_yaml(path)


def test_an_oversized_config_is_refused_before_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("data: {cache: c}\n" + "# padding\n" * 200)
    monkeypatch.setattr(limits, "MAX_CONFIG_BYTES", 1000)
    with pytest.raises(ConfigError, match="more than the limit of 1,000"):
        read_yaml(path)


def test_a_config_in_latin1_or_with_a_bom(tmp_path: Path) -> None:
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfdata: {cache: c}\n")
    assert load_config(bom).data.cache == "c"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"data: {cache: caf\xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8 text \\(byte 0xe9"):
        load_config(latin)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.lr=.inf",
        "trainer.lr=.nan",
        "trainer.weight_decay=.inf",
        "trainer.grad_clip=.inf",
        "trainer.lr_decay=.nan",
        "model.options={channels: [8, 16], scale: .inf}",
        "objective.name=sam",
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(override: str) -> None:
    extra = ["objective.temperature=.inf"] if override == "objective.name=sam" else []
    with pytest.raises(ConfigError, match=r"must be a finite number|should be") as info:
        load_config(overrides=["data.cache=c", override, *extra])
    key = (extra or [override])[0].split("=")[0]
    assert f"key '{key}'" in str(info.value) or "options.scale" in str(info.value)


NUMERIC = ["trainer.lr", "trainer.weight_decay", "trainer.lr_decay", "trainer.grad_clip"]
VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
    st.sampled_from([".inf", "-.inf", ".nan", "1e309", "0", "-0.0", "abc", "[1]", "{}", "~"]),
)


@FUZZ
@given(values=st.lists(st.tuples(st.sampled_from(NUMERIC), VALUE), min_size=1, max_size=4))
@example(values=[("trainer.lr", ".inf")])
@example(values=[("trainer.weight_decay", float("inf"))])
def test_random_numbers_give_a_finite_config_or_a_clean_error(values: list) -> None:
    overrides = ["data.cache=c"] + [
        f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in values
    ]
    try:
        cfg = load_config(overrides=overrides)
    except ConfigError as exc:
        assert all(line.startswith("config: ") for line in str(exc).splitlines())
        return
    t = cfg.trainer
    assert 0 < t.lr < float("inf") and 0 <= t.weight_decay < float("inf")


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=30,
)


@FUZZ
@given(tree=trees, anchors=st.integers(0, 12), cut=st.integers(0, 400))
def test_random_yaml_documents_read_or_fail_cleanly(
    tmp_path: Path, tree: object, anchors: int, cut: int
) -> None:
    text = yaml.safe_dump({"data": {"cache": "c"}, "x": tree})
    # stack aliases on top (each level doubles what the one before expands to)
    text += "".join(
        f"a{i}: &a{i} [{'*a' + str(i - 1) if i else '1'}, {'*a' + str(i - 1) if i else '2'}]\n"
        for i in range(anchors)
    )
    if cut < len(text) and cut % 3 == 0:
        text = text[:cut]  # a truncated document too
    path = tmp_path / "c.yaml"
    path.write_text(text)
    start = time.perf_counter()
    try:
        loaded = read_yaml(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
    else:
        assert isinstance(loaded, dict)
    assert time.perf_counter() - start < 5
