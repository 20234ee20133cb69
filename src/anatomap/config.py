"""Typed run configuration: YAML -> validated pydantic models.

Unknown keys and wrong types are rejected with a message naming the key. ``key=value``
overrides (values parsed as YAML scalars) are applied before validation. YAML is read with
``yaml.safe_load``, so no configuration can construct objects or execute code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from anatomap.errors import ConfigError


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    """Where the training volumes come from and how views are cut."""

    cache: str = Field(description="cache folder written by `anatomap data cache`")
    heldout: list[str] = Field(default_factory=list, description="subjects kept out of training")
    heldout_file: str | None = Field(
        default=None, description="CSV with subject,split columns; split=heldout is held out"
    )
    samples_per_epoch: int = Field(default=256, gt=0)
    num_workers: int = Field(default=0, ge=0)


class ModelConfig(Strict):
    """Encoder choice (see `anatomap.models.encoders`)."""

    name: str = "small_cnn"
    embed_dim: int = Field(default=64, gt=0)
    spatial_dims: Literal[2, 3] = 3
    options: dict[str, Any] = Field(default_factory=dict)


class ObjectiveConfig(Strict):
    """Method name plus its own parameters (validated by the method's config class)."""

    model_config = ConfigDict(extra="allow")
    name: str = "isimed"


class TrainerConfig(Strict):
    """Optimisation and Lightning trainer settings."""

    max_steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=4, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    lr_decay: float = Field(default=0.9, gt=0, le=1, description="multiplied in once per epoch")
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float | None = Field(default=2.0, gt=0)
    precision: str = Field(default="auto", description="auto | 32-true | bf16-mixed | 16-mixed")
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(default=1, gt=0)
    strategy: str = "auto"
    checkpoint_every: int = Field(default=100, gt=0)
    log_every: int = Field(default=10, gt=0)
    seed: int = 0
    progress: bool = True


class RunConfig(Strict):
    """The whole configuration of a pretraining run."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    output: str = Field(default="runs/run", description="run folder")

    @field_validator("output")
    @classmethod
    def _no_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars/lists (``lr=1e-3``, ``a=[1,2]``)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
        out.append((key, value))
    return out


def _format_validation(exc: ValidationError, source: str) -> str:
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


def validate_model(model: type[BaseModel], data: dict, source: str) -> Any:
    """Validate ``data`` into ``model``, turning pydantic errors into a ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> RunConfig:
    """Read a YAML file (or start from ``base``), apply overrides, validate everything.

    The objective's own parameters are validated too (by the registered method's config).
    """
    source = str(path) if path is not None else "config"
    tree: dict = copy.deepcopy(base) if base else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read config ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree.update(loaded)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, source)
    cfg = validate_model(RunConfig, tree, source)
    from anatomap.objectives.registry import objective_config

    objective_config(cfg.objective, source=source)  # validates the method's parameters
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a resolved config (what a run writes to ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
