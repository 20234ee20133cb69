"""Pydantic validation with one-line errors naming the key (shared by every config model).

Kept apart from :mod:`anatomap.config` so that the objective registry can validate a
method's parameters without importing the run configuration (which imports the registry).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from anatomap.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def format_validation(exc: ValidationError, source: str) -> str:
    """One line per pydantic error: ``SOURCE: unknown key 'a.b'``, ``... key 'a.b': ...``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        else:
            lines.append(f"{source}: key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _non_finite(value: Any, key: str = "") -> list[tuple[str, float]]:
    """``(dotted key, value)`` of the NaN / infinite numbers in a dumped model."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [(key, value)]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _non_finite(v, f"{key}.{k}".lstrip("."))]
    if isinstance(value, list | tuple):
        return [x for i, v in enumerate(value) for x in _non_finite(v, f"{key}[{i}]")]
    return []


def validate_model(model: type[M], data: Any, source: str) -> M:
    """Validate ``data`` into ``model``, turning pydantic errors into a :class:`ConfigError`.

    Every number must be finite: a NaN or infinite value (``lr=.inf``) is refused naming the key.
    """
    try:
        out = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: refused: nested too deeply") from None
    bad = _non_finite(out.model_dump())
    if bad:
        raise ConfigError(
            "\n".join(f"{source}: key '{k}': must be a finite number (got {v})" for k, v in bad)
        )
    return out
