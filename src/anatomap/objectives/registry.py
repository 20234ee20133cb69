"""Registry of self-supervised objectives (one module per method, registered by name)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from anatomap.errors import ConfigError
from anatomap.registry import Registry
from anatomap.validation import validate_model

if TYPE_CHECKING:
    from anatomap.objectives.base import Objective, ObjectiveParams


def _load_builtins() -> None:
    # Importing the package registers the built-in methods.
    import anatomap.objectives  # noqa: F401


OBJECTIVES: Registry[type[Objective]] = Registry("objective", builtins=_load_builtins)


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: register an :class:`Objective` subclass under ``name`` (once)."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        OBJECTIVES.add(name, cls)
        cls.name = name
        return cls

    return wrap


def list_objectives(filter: str | None = None) -> list[str]:
    """Registered method names, sorted (``filter``: fnmatch pattern such as ``"s*"``)."""
    return OBJECTIVES.names(filter)


def get_objective(name: str) -> type[Objective]:
    """The method registered as ``name`` (unknown: :class:`ConfigError` listing them)."""
    return OBJECTIVES.get(name)


def objective_config(cfg: BaseModel | Mapping[str, Any], source: str = "config") -> ObjectiveParams:
    """Validate a method's own parameters (everything in the section but ``name``).

    A loaded :class:`~anatomap.config.RunConfig` already holds them, validated once
    (``cfg.objective_params``); this is for other sources (a checkpoint's ``meta.json``).
    """
    data = cfg.model_dump() if isinstance(cfg, BaseModel) else dict(cfg)
    name = data.pop("name", "isimed")
    cls = get_objective(name)
    try:
        return validate_model(cls.Config, data, source)
    except ConfigError as exc:
        msg = str(exc).replace("key '", "key 'objective.")
        raise ConfigError(msg) from None
