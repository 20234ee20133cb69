"""The layers of the package: every import points down (docs/architecture.md).

geometry, io, errors  <  data, models  <  objectives  <  checkpoint  <  train, infer, eval
<  workflows, api, cli. Lazy imports inside functions count too. Sizes: no module over 500
lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "anatomap"

# What each part of the package must never import (any anatomap.<part> module).
FORBIDDEN: dict[str, set[str]] = {
    "geometry": {"data", "models", "objectives", "checkpoint", "train", "infer", "eval"},
    "io": {"data", "models", "objectives", "checkpoint", "train", "infer", "eval"},
    "data": {"objectives", "checkpoint", "train", "infer", "eval", "workflows", "cli"},
    "models": {"data", "objectives", "checkpoint", "train", "infer", "eval", "workflows"},
    "objectives": {"checkpoint", "train", "infer", "eval", "workflows", "cli", "api"},
    "checkpoint": {"train", "infer", "eval", "workflows", "cli", "api"},
    "infer": {"train", "eval", "workflows", "cli", "api"},
    "eval": {"train", "workflows", "cli", "api"},
    "train": {"eval", "workflows", "cli", "api"},
    # shipped models (files only): read by checkpoint, so below it
    "zoo": {"data", "models", "objectives", "checkpoint", "train", "infer", "eval", "workflows"},
}

# ``Volume`` (array + affine, numpy only) is the type the readers return: io may use it.
ALLOWED = {("io", "anatomap.data.volume")}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "anatomap":  # from anatomap import geometry
                found += [(node.lineno, f"anatomap.{a.name}") for a in node.names]
    return [(n, m) for n, m in found if m == "anatomap" or m.startswith("anatomap.")]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_import_points_down() -> None:
    wrong = []
    for path in _modules():
        part = _part(path)
        for line, module in _imports(path):
            target = module.split(".")[1] if "." in module else ""
            if target in FORBIDDEN.get(part, set()) and (part, module) not in ALLOWED:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not wrong, "imports that climb the layers:\n" + "\n".join(wrong)


def test_the_check_sees_a_climbing_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from anatomap.train.module import PretrainModule\n")
    assert _imports(bad) == [(2, "anatomap.train.module")]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_500_lines(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= 500, f"{path.relative_to(PACKAGE)} has {n} lines"


def _long_functions(path: Path, limit: int = 80) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(PACKAGE)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n.end_lineno or n.lineno) - n.lineno + 1 > limit
    ]


def test_no_function_over_80_lines() -> None:
    long = [f for path in _modules() for f in _long_functions(path)]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
