"""The Python API: one function per CLI command, usable from a notebook.

>>> import anatomap as am
>>> result = am.index("scans/")                     # anatomap data index
>>> am.write_manifest(result, "manifest.jsonl")
>>> am.cache("manifest.jsonl", "cache/", preset="mri", spacing=1.5)   # anatomap data cache
>>> cfg = am.load_config("isimed", ["data.cache=cache/", "output=runs/isimed"])
>>> run = am.pretrain(cfg)                           # anatomap pretrain
>>> am.evaluate(run.run_dir).metrics                 # anatomap evaluate
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from anatomap.config import RunConfig
from anatomap.config import load_config as _load_config
from anatomap.data.cache import Cache, CacheBuildResult, build_cache
from anatomap.data.manifest import IndexResult, index_directory
from anatomap.errors import ConfigError
from anatomap.eval.evaluate import EvalResult
from anatomap.eval.evaluate import evaluate as _evaluate
from anatomap.train.pretrain import PretrainResult
from anatomap.train.pretrain import pretrain as _pretrain


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


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML config (file or packaged name) with ``key=value`` overrides."""
    return _load_config(config_path(name_or_path), overrides)


def index(root: str | Path, **kwargs) -> IndexResult:
    """Find and validate every scan under ``root`` (see :func:`index_directory`)."""
    return index_directory(root, **kwargs)


def cache(manifest, out: str | Path, **kwargs) -> CacheBuildResult:
    """Preprocess a manifest into a memory-mapped cache (see :func:`build_cache`)."""
    return build_cache(manifest, out, **kwargs)


def pretrain(cfg: RunConfig | str | Path, **kwargs) -> PretrainResult:
    """Train a config (object, file or packaged name)."""
    if not isinstance(cfg, RunConfig):
        path = config_path(cfg)
        kwargs.setdefault("config_dir", path.parent)
        cfg = _load_config(path)
    return _pretrain(cfg, **kwargs)


def evaluate(run_or_checkpoint: str | Path, **kwargs) -> EvalResult:
    """Evaluate a run folder or checkpoint (see :func:`anatomap.eval.evaluate.evaluate`)."""
    return _evaluate(run_or_checkpoint, **kwargs)


def open_cache(path: str | Path) -> Cache:
    return Cache(path)
