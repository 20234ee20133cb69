"""``anatomap benchmark``: every method on the same data, encoder and step budget.

For each selected objective (default: every registered one) the benchmark writes the
method's recipe (its packaged ``configs/<name>.yaml`` when there is one, else the method's
defaults) with the benchmark's shared data, encoder and trainer budget, trains it in a
child process (so its wall time and peak memory are its own), evaluates the run with the
whole evaluation suite, and writes ``benchmark.json``, ``benchmark.md`` and
``benchmark.html``: one row per method plus the random-init encoder (and the registration
baselines of the landmark task), one column per metric, the best of each column marked.

Runs are resumable: a method whose run finished is not trained again, one that was
interrupted continues from its last Lightning checkpoint, and an evaluation newer than its
checkpoint is reused. Every run folder is an ordinary run: ``anatomap evaluate RUN`` works
on it.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from anatomap.config import (
    ModelConfig,
    apply_overrides,
    config_path,
    dump_config,
    load_config,
    read_yaml,
)
from anatomap.errors import AnatomapError, ConfigError
from anatomap.io.atomic import atomic_write_json, atomic_write_text
from anatomap.validation import validate_model

RUNS = "{runs}"  # placeholder in per-method overrides: this benchmark's runs folder


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchData(_Strict):
    cache: str | None = None  # an existing cache; else the embedded demo is built
    heldout_file: str | None = None  # CSV subject,split (with cache)
    heldout: list[str] = Field(default_factory=list)  # or subject ids (with cache)
    subjects: int = Field(default=16, ge=3)  # demo subjects
    demo_heldout: int = Field(default=4, ge=1)
    spacing: float = Field(default=2.0, gt=0)
    demo: Literal["synthetic", "template"] = "synthetic"  # which demo to build (no cache)
    renders: int = Field(default=1, ge=1, le=8)  # synthetic demo: contrasts per subject
    modalities: list[str] = Field(default_factory=lambda: ["T1w"])  # template demo contrasts
    num_workers: int | Literal["auto"] = 2  # or "auto": the faster of in-process and workers
    samples_per_epoch: int = Field(default=200, gt=0)


class BenchEvaluate(_Strict):
    tasks: list[str] | None = None  # None: every task that applies to the checkpoint
    options: dict[str, Any] = Field(default_factory=dict)  # passed to evaluate()
    registration: bool = True  # registration baselines (once, with the first dense method)


class BenchmarkConfig(_Strict):
    data: BenchData = Field(default_factory=BenchData)
    methods: list[str] | None = None  # None: every registered objective
    exclude: list[str] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    trainer: dict[str, Any] = Field(default_factory=dict)  # shared budget, e.g. max_steps
    method_overrides: dict[str, list[str]] = Field(default_factory=dict)  # key=value per method
    evaluate: BenchEvaluate = Field(default_factory=BenchEvaluate)
    quick: dict[str, Any] = Field(default_factory=dict)  # merged over the rest by --quick
    output: str = "benchmark_out"


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_benchmark_config(
    path: str | Path, overrides: list[str] | None = None, quick: bool = False
) -> BenchmarkConfig:
    """Read a benchmark YAML (a path or a packaged name such as ``benchmark``) with the run
    config's loader: safe YAML, ``--quick`` block merged, ``key=value`` overrides, validation."""
    p = config_path(path)
    tree = read_yaml(p)
    if quick:
        tree = _merge(tree, tree.get("quick") or {})
    return validate_model(BenchmarkConfig, apply_overrides(tree, overrides, str(p)), str(p))


def select_methods(cfg: BenchmarkConfig, methods: list[str] | None = None) -> list[str]:
    """The methods to run, in an order where a method runs after the runs it refers to."""
    from anatomap.objectives.registry import list_objectives

    known = list_objectives()
    chosen = list(methods or cfg.methods or known)
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; registered: {', '.join(known)}")
    chosen = [m for m in chosen if m not in cfg.exclude]

    def deps(m: str) -> set[str]:
        found = set()
        for item in cfg.method_overrides.get(m, []):
            for other in chosen:
                if f"{RUNS}/{other}" in item and other != m:
                    found.add(other)
        return found

    ordered: list[str] = []
    pending = list(chosen)
    while pending:
        ready = [m for m in pending if deps(m) <= set(ordered)]
        if not ready:
            raise ConfigError(f"method_overrides refer to each other in a cycle: {pending}")
        ordered.append(ready[0])
        pending.remove(ready[0])
    return ordered


def method_config(
    cfg: BenchmarkConfig, method: str, cache: Path, heldout_file: Path | None, runs: Path
):
    """The method's recipe with the benchmark's data, encoder and budget (a RunConfig)."""
    try:
        path: Path | None = config_path(method)
    except ConfigError:
        path = None
    overrides = [
        f"data.cache={cache}",
        f"data.num_workers={cfg.data.num_workers}",
        f"data.samples_per_epoch={cfg.data.samples_per_epoch}",
        f"output={runs / method}",
        "trainer.progress=false",
    ]
    if heldout_file is not None:
        overrides += [f"data.heldout_file={heldout_file}", "data.heldout=[]"]
    else:
        overrides += [f"data.heldout={json.dumps(cfg.data.heldout)}"]
    for k, v in cfg.model.model_dump(mode="json").items():
        overrides.append(f"model.{k}={json.dumps(v)}")
    for k, v in cfg.trainer.items():
        overrides.append(f"trainer.{k}={json.dumps(v)}")
    overrides += [o.replace(RUNS, str(runs)) for o in cfg.method_overrides.get(method, [])]
    base = None if path is not None else {"objective": {"name": method}}
    return load_config(path, overrides, base=base)


@dataclass
class RunStats:
    status: str  # "done" | "failed"
    wall_s: float
    peak_rss_mb: float
    workers_peak_rss_mb: float
    steps: int
    error: str = ""


def _stats_path(run: Path) -> Path:
    return run / "benchmark_run.json"


def _read_stats(run: Path) -> dict[str, Any]:
    p = _stats_path(run)
    return json.loads(p.read_text()) if p.is_file() else {}


def train_child(config_yaml: Path, stats_json: Path, resume: bool) -> int:
    """Entry point of the child process: train, then record wall time and peak memory."""
    from anatomap.train.pretrain import pretrain

    cfg = load_config(config_yaml)
    t0 = time.perf_counter()
    error = ""
    steps = 0
    try:
        steps = pretrain(cfg, resume=resume, overwrite=not resume).steps
    except AnatomapError as exc:
        error = str(exc)
    wall = time.perf_counter() - t0
    kib = 1024.0  # ru_maxrss is in KiB on Linux
    stats = {
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        # Data workers are forked: their ru_maxrss starts at the trainer's RSS at fork time
        # (shared pages included), so this is an upper bound of their own use.
        "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
        "steps": steps,
        "error": error,
    }
    atomic_write_json(stats_json, stats, what="run statistics")
    return 1 if error else 0


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): ``VmHWM``, which starts afresh at ``exec``
    (``ru_maxrss`` does not: it keeps the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_method(run_cfg, log: Callable[[str], None] = print) -> RunStats:
    """Train one method in a child process (resuming an interrupted run); accumulate stats."""
    run = Path(run_cfg.output)
    prev = _read_stats(run)
    if prev.get("status") == "done" and (run / "checkpoint").is_dir():
        log(f"      reusing finished run {run}")
        return RunStats(**{k: prev[k] for k in RunStats.__dataclass_fields__ if k in prev})
    resume = (run / "lightning" / "last.ckpt").is_file()
    run.mkdir(parents=True, exist_ok=True)
    cfg_file = run / "benchmark_config.yaml"
    atomic_write_text(cfg_file, dump_config(run_cfg), what="run config")
    seg = run / "benchmark_segment.json"
    seg.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "anatomap.workflows.benchmark", str(cfg_file), str(seg)]
    if resume:
        cmd.append("--resume")
        log(f"      resuming interrupted run {run}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if seg.is_file():
        part = json.loads(seg.read_text())
    else:  # the child died before writing its stats
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        part = {"wall_s": 0.0, "peak_rss_mb": 0.0, "workers_peak_rss_mb": 0.0, "steps": 0}
        part["error"] = f"training process exited with {proc.returncode}: {' | '.join(tail)}"
    stats = RunStats(
        status="failed" if part.get("error") else "done",
        wall_s=float(prev.get("wall_s", 0.0)) + part["wall_s"],  # segments add up
        peak_rss_mb=max(float(prev.get("peak_rss_mb", 0.0)), part["peak_rss_mb"]),
        workers_peak_rss_mb=max(
            float(prev.get("workers_peak_rss_mb", 0.0)), part["workers_peak_rss_mb"]
        ),
        steps=int(part["steps"]),
        error=part.get("error", ""),
    )
    atomic_write_json(_stats_path(run), stats.__dict__)
    return stats


def evaluate_method(
    run: Path, cfg: BenchmarkConfig, registration: bool, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Evaluate a finished run (reusing an evaluation newer than its checkpoint)."""
    from anatomap.eval.evaluate import evaluate

    out = run / "eval"
    metrics_file = out / "metrics.json"
    model_file = run / "checkpoint" / "model.safetensors"
    fresh = (
        metrics_file.is_file()
        and model_file.is_file()
        and metrics_file.stat().st_mtime >= model_file.stat().st_mtime
    )
    if fresh:
        saved = json.loads(metrics_file.read_text())
        if saved.get("benchmark_registration", False) == registration:
            log(f"      reusing evaluation {out}")
            return saved
    options = dict(cfg.evaluate.options)
    res = evaluate(
        run,
        out=out,
        progress=False,
        tasks=cfg.evaluate.tasks,
        all_tasks=True,
        registration=registration,
        **options,
    )
    res.metrics["benchmark_registration"] = registration
    atomic_write_json(metrics_file, json.loads(json.dumps(res.metrics, default=str)))
    return res.metrics


def run_benchmark(
    cfg: BenchmarkConfig,
    *,
    methods: list[str] | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train and evaluate every selected method; returns the folder with the tables."""
    from anatomap.workflows.benchmark_table import write_benchmark_report
    from anatomap.workflows.demo import prepare_demo

    out_dir = Path(out or cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = select_methods(cfg, methods)
    if cfg.data.cache:
        cache = Path(cfg.data.cache)
        heldout_file = Path(cfg.data.heldout_file) if cfg.data.heldout_file else None
    else:
        cache, heldout_file = prepare_demo(
            out_dir / "demo",
            n_subjects=cfg.data.subjects,
            n_heldout=cfg.data.demo_heldout,
            spacing=cfg.data.spacing,
            modalities=tuple(cfg.data.modalities),
            synthetic=cfg.data.demo == "synthetic",
            renders=cfg.data.renders,
            progress=False,
            log=log,
            steps=3,
        )
    runs = out_dir / "runs"
    results: dict[str, dict[str, Any]] = {}
    registration_done = not cfg.evaluate.registration
    for i, method in enumerate(chosen, 1):
        log(f"[{i}/{len(chosen)}] {method}")
        entry: dict[str, Any] = {"run": str(runs / method)}
        try:
            run_cfg = method_config(cfg, method, cache, heldout_file, runs)
            entry["encoder"] = run_cfg.model.name
            stats = train_method(run_cfg, log)
            entry["train"] = stats.__dict__
            if stats.status != "done":
                raise AnatomapError(stats.error)
            log(f"      trained {stats.steps} steps in {stats.wall_s:.0f} s")
            from anatomap.objectives.registry import get_objective

            dense = bool(getattr(get_objective(method), "dense_output", False))
            with_reg = dense and not registration_done
            entry["metrics"] = evaluate_method(runs / method, cfg, with_reg, log)
            registration_done = registration_done or with_reg
        except AnatomapError as exc:
            entry["error"] = str(exc)
            log(f"      failed: {exc}")
        results[method] = entry
    return write_benchmark_report(out_dir, cfg, results)


def main(argv: list[str] | None = None) -> int:
    """``python -m anatomap.workflows.benchmark CONFIG STATS [--resume]``: the training child."""
    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    if len(args) != 2:
        print("usage: python -m anatomap.workflows.benchmark RUN_CONFIG STATS_JSON [--resume]")
        return 2
    return train_child(Path(args[0]), Path(args[1]), resume)


if __name__ == "__main__":
    sys.exit(main())
