"""Pydantic validation with one-line errors naming the key (shared by every config model).

Kept apart from :mod:`anatomap.config` so that the objective registry can validate a
method's parameters without importing the run configuration (which imports the registry).
"""

from __future__ import annotations

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


def validate_model(model: type[M], data: Any, source: str) -> M:
    """Validate ``data`` into ``model``, turning pydantic errors into a :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, source)) from None
