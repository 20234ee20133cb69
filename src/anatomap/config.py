"""Typed run configuration: YAML -> validated pydantic models (the one config loader).

Unknown keys and wrong types are rejected with a message naming the key. ``key=value``
overrides (values parsed as YAML scalars) are applied before validation. YAML is read with
``yaml.safe_load``, so no configuration can construct objects or execute code.
:func:`read_yaml`, :func:`apply_overrides` and :func:`~anatomap.validation.validate_model`
also serve the benchmark's own config. :func:`load_config` validates a run config once,
the method's own parameters included (:attr:`RunConfig.objective_params`).
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from anatomap import limits
from anatomap.errors import ConfigError
from anatomap.io.text import read_text
from anatomap.validation import validate_model

if TYPE_CHECKING:
    from anatomap.objectives.base import ObjectiveParams

__all__ = [
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "RunConfig",
    "Strict",
    "TrainerConfig",
    "apply_overrides",
    "config_path",
    "dump_config",
    "load_config",
    "objective_params",
    "parse_overrides",
    "read_yaml",
    "validate_model",
]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthDataConfig(Strict):
    """Train on synthetic subjects rendered on the fly (:mod:`anatomap.data.synth`); the cache
    still supplies the held-out evaluation subjects (one channel, like the synthetic views)."""

    labels: list[str] = Field(
        default_factory=list,
        description="label map, folder of binary masks or mask files; empty: the MNI152 brain",
    )
    label_spacing: float | None = Field(
        default=None, gt=0, description="resample the label maps first (mm)"
    )
    landmarks: str = Field(default="dosenbach", description="brain landmarks: dosenbach | power")
    reuse: int = Field(
        default=1, ge=1, description="consecutive samples one rendered subject serves (batch size)"
    )
    generator: dict[str, Any] = Field(
        default_factory=dict, description="SynthConfig fields (docs/synthetic.md)"
    )

    @field_validator("generator")
    @classmethod
    def _known_knobs(cls, value: dict[str, Any]) -> dict[str, Any]:
        from anatomap.data.synth.config import SynthConfig

        SynthConfig.model_validate(value)
        return value


class DataConfig(Strict):
    """Where the training volumes come from and how views are cut."""

    cache: str = Field(description="cache folder written by `anatomap data cache`")
    heldout: list[str] = Field(default_factory=list, description="subjects kept out of training")
    heldout_file: str | None = Field(
        default=None, description="CSV with subject,split columns; split=heldout is held out"
    )
    samples_per_epoch: int = Field(default=256, gt=0)
    num_workers: int | Literal["auto"] = Field(
        default=0,
        description="DataLoader worker processes (0: in the training process); auto: worker "
        "processes on spare cores if they deliver batches faster than the training process "
        "(timed at the start of training; run.json: loader)",
    )
    modality_per_view: bool = Field(
        default=False,
        description="each view shows one of the subject's modalities (different ones per "
        "view where there are several): positives across contrasts; the encoder takes one "
        "channel",
    )
    cross_modality: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="with modality_per_view: share of samples whose views show different "
        "modalities (the others show one modality, drawn at random, in every view)",
    )
    synth: SynthDataConfig | None = Field(
        default=None, description="train on synthetic subjects generated on the fly"
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("must be a number of worker processes (0 or more) or auto")


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


PRECISIONS = (
    *("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"),
    *("32", "16", "bf16", "64", "transformer-engine", "transformer-engine-float16"),
)
"""``trainer.precision``: ``auto`` (bf16 or fp16 autocast on CUDA, fp32 on CPU) or one of
Lightning's precision strings."""


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
    channels_last: bool = Field(
        default=False,
        description="channels-last-3d memory format for the model and its input (GPU speed)",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the encoder's feature pyramid (GPU; compiling costs minutes)",
    )
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(default=1, gt=0)
    strategy: str = "auto"
    checkpoint_every: int = Field(default=100, gt=0)
    log_every: int = Field(default=10, gt=0)
    seed: int = 0
    progress: bool = True

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, v: str) -> str:
        if v not in PRECISIONS:
            raise ValueError(f"must be one of {', '.join(PRECISIONS)}")
        return v


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

    @model_validator(mode="after")
    def _renders_need_one_per_view(self) -> RunConfig:
        synth = self.data.synth
        renders = int(synth.generator.get("renders", 1)) if synth is not None else 1
        if renders > 1 and not self.data.modality_per_view:
            raise ValueError(
                "data.synth.generator.renders > 1 needs data.modality_per_view: true "
                "(each view shows one render)"
            )
        return self

    @property
    def objective_params(self) -> ObjectiveParams:
        """The method's own parameters (``objective`` but ``name``), validated by its config."""
        return objective_params(self.objective)


def config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a packaged config (``isimed``, ``demo``...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        raise ConfigError(f"{p}: config file not found")
    packaged = resources.files("anatomap") / "configs" / f"{Path(str(name_or_path)).stem}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    names = sorted(
        f.name.removesuffix(".yaml")
        for f in (resources.files("anatomap") / "configs").iterdir()
        if f.name.endswith(".yaml")
    )
    raise ConfigError(
        f"{name_or_path}: no such config file or packaged config ({', '.join(names)})"
    )


def _expanded(node: yaml.Node, depth: int, memo: dict[int, int], active: set[int]) -> int:
    """Nodes under ``node`` once every alias is expanded (aliases share nodes: memoised)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ValueError("an alias refers to a node that contains it (recursive alias)")
    if depth > limits.MAX_CONFIG_DEPTH:
        raise ValueError(f"nested deeper than {limits.MAX_CONFIG_DEPTH} levels")
    active.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded(c, depth + 1, memo, active) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            n += _expanded(k, depth + 1, memo, active) + _expanded(v, depth + 1, memo, active)
    active.discard(key)
    if n > limits.MAX_CONFIG_NODES:
        raise ValueError(
            f"more than {limits.MAX_CONFIG_NODES:,} values once its aliases are expanded "
            "(an alias bomb?)"
        )
    memo[key] = n
    return n


def safe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` within the limits of :mod:`anatomap.limits`: size, nesting
    depth, and values once aliases are expanded (checked on the node graph, which shares
    aliased nodes, before anything is built). Raises :class:`ConfigError` naming ``source``."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source}: {size:,} bytes of YAML, more than the limit of {limits.MAX_CONFIG_BYTES:,}"
        )
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _expanded(node, 0, {}, set())
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (ValueError, RecursionError) as exc:
        why = (
            f"nested deeper than {limits.MAX_CONFIG_DEPTH} levels"
            if isinstance(exc, RecursionError)
            else str(exc)
        )
        raise ConfigError(f"{source}: refused: {why}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file, read with ``yaml.safe_load`` (empty: ``{}``)
    within the size, depth and alias limits of :func:`safe_yaml`."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    text = read_text(p, "config", limits.MAX_CONFIG_BYTES, ConfigError)
    loaded = safe_yaml(text, str(p))
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return loaded


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
        value = safe_yaml(raw, f"override '{item}'") if raw != "" else ""
        out.append((key, value))
    return out


def apply_overrides(tree: dict, overrides: list[str] | None, source: str = "config") -> dict:
    """Apply ``key.sub=value`` overrides to a config tree in place (and return it)."""
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, source)
    return tree


def objective_params(objective: ObjectiveConfig, source: str = "config") -> ObjectiveParams:
    """The method's own parameters, validated by its config class (once per distinct section:
    :func:`load_config` validates them, later calls return the same object)."""
    from anatomap.objectives.registry import get_objective, objective_config  # the methods

    key = (
        get_objective(objective.name),  # the class too: tests re-register temporary methods
        json.dumps(objective.model_dump(mode="json"), sort_keys=True, default=str),
    )
    params = _PARAMS.get(key)
    if params is None:
        params = _PARAMS[key] = objective_config(objective, source=source)
        while len(_PARAMS) > 256:
            _PARAMS.pop(next(iter(_PARAMS)))
    return params


_PARAMS: dict[tuple[type, str], ObjectiveParams] = {}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> RunConfig:
    """Read a YAML file (or start from ``base``), apply overrides, validate everything.

    This is the one place a run configuration is validated: the sections and the
    objective's own parameters (by the registered method's config), the latter kept for
    :attr:`RunConfig.objective_params`.
    """
    source = str(path) if path is not None else "config"
    tree: dict = copy.deepcopy(base) if base else {}
    if path is not None:
        tree.update(read_yaml(path))
    apply_overrides(tree, overrides, source)
    cfg = validate_model(RunConfig, tree, source)
    objective_params(cfg.objective, source=source)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a resolved config (what a run writes to ``config.yaml``)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
