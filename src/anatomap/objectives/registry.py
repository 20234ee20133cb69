"""Registry of self-supervised objectives (one module per method, registered by name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from anatomap.errors import ConfigError

if TYPE_CHECKING:
    from anatomap.config import ObjectiveConfig
    from anatomap.objectives.base import Objective

_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: register an :class:`Objective` subclass under ``name``."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        if name in _OBJECTIVES:
            raise ValueError(f"objective '{name}' registered twice")
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    # Importing the package registers the built-in methods.
    import anatomap.objectives  # noqa: F401


def list_objectives() -> list[str]:
    _load_builtins()
    return sorted(_OBJECTIVES)


def get_objective(name: str) -> type[Objective]:
    _load_builtins()
    if name not in _OBJECTIVES:
        raise ConfigError(
            f"unknown objective '{name}'; registered: {', '.join(sorted(_OBJECTIVES))}"
        )
    return _OBJECTIVES[name]


def objective_config(cfg: ObjectiveConfig | dict[str, Any], source: str = "config") -> Any:
    """Validate the method's own parameters (everything in the section but ``name``)."""
    from anatomap.config import validate_model

    data = dict(cfg) if isinstance(cfg, dict) else cfg.model_dump()
    name = data.pop("name", "isimed")
    cls = get_objective(name)
    try:
        return validate_model(cls.Config, data, source)
    except ConfigError as exc:
        msg = str(exc).replace("key '", "key 'objective.")
        raise ConfigError(msg) from None
