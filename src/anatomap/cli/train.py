"""``anatomap pretrain``, ``mine``, ``demo`` and ``benchmark``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from anatomap.cli.evaluate import print_position_table, print_robustness_table
from anatomap.cli.options import add_device, add_quiet, check_device
from anatomap.cli.report import OK
from anatomap.errors import AnatomapError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from anatomap.api import config_path, load_config
    from anatomap.train.pretrain import pretrain

    path = config_path(args.config)
    quiet = ["trainer.progress=false"] if args.quiet else []
    cfg = load_config(path, [*args.overrides, *quiet])
    if not args.quiet:
        _show_info_logs()  # e.g. the loader chosen by data.num_workers: auto
    res = pretrain(cfg, resume=args.resume, overwrite=args.overwrite, config_dir=path.parent)
    if res.is_global_zero:
        print(f"trained {res.steps} steps; checkpoint: {res.checkpoint}")
    return OK


def _show_info_logs() -> None:
    """anatomap's INFO messages (not Lightning's) to stderr, one line each."""
    logger = logging.getLogger("anatomap")
    if not any(getattr(h, "_anatomap_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("anatomap: %(message)s"))
        handler._anatomap_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def cmd_mine(args: argparse.Namespace) -> int:
    from anatomap.api import config_path, load_config
    from anatomap.data.cache import Cache
    from anatomap.infer.mining import pairs_for
    from anatomap.objectives.base import Objective
    from anatomap.objectives.registry import get_objective
    from anatomap.train.module import heldout_subjects

    check_device(args.device)
    path = config_path(args.config)
    cfg = load_config(path, args.overrides)
    method = get_objective(cfg.objective.name)
    if method.mining_request.__func__ is Objective.mining_request.__func__:  # type: ignore[attr-defined]
        raise AnatomapError(
            f"{path}: `anatomap mine` is for alice configs, not {cfg.objective.name}"
        )
    cache = Cache(cfg.data.cache)
    held = set(heldout_subjects(cfg, path.parent))
    train = [s for s in cache.subjects if s not in held]
    request = method.mining_request(cfg.objective_params)
    mined = pairs_for(
        request, cache, train, cfg.trainer.seed, progress=not args.quiet, device=args.device
    )
    if mined is None:
        print("same-volume views without a SAM checkpoint: nothing to mine")
    else:
        i = mined.info
        print(
            f"{len(mined)} pairs ({i['failed']} dropped, mean score {i['mean_score']:.3f}) "
            f"in {mined.root}, mined with {i['sam_checkpoint']} ({i['sam_fingerprint']})"
        )
    return OK


def cmd_demo(args: argparse.Namespace) -> int:
    from anatomap.workflows.demo import run_demo

    res = run_demo(
        args.out,
        n_subjects=args.subjects,
        n_heldout=args.heldout,
        spacing=args.spacing,
        overrides=args.overrides,
        progress=not args.quiet,
        config=args.config,
        modalities=tuple(args.modalities.split(",")),
        evaluate_options={"registration": not args.no_registration},
        matching=not args.no_matching,
    )
    print()
    print_position_table(res.evaluation.metrics)
    print_robustness_table(res.evaluation.metrics)
    if res.matching:
        print("\nmatching MNI152 landmarks into unseen scans (held-out contrasts / warps):")
        print("\n".join(res.matching))
    print(f"\nreport: {res.report}")
    return OK


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anatomap.workflows.benchmark import load_benchmark_config, run_benchmark

    config, overrides = args.config, list(args.overrides)
    if "=" in config:  # `anatomap benchmark key=value`: the packaged config with an override
        config, overrides = "benchmark", [config, *overrides]
    cfg = load_benchmark_config(config, overrides, quick=args.quick)
    methods = args.methods.split(",") if args.methods else None
    log = (lambda _line: None) if args.quiet else print
    page = run_benchmark(cfg, methods=methods, out=args.out, log=log)
    print((page.parent / "benchmark.md").read_text(encoding="utf-8"))
    print(f"report: {page}")
    return OK


def _add_pretrain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap pretrain``."""
    p = sub.add_parser("pretrain", help="train a config: pretrain CONFIG [key=value ...]")
    p.add_argument("config", help="YAML file or packaged config name (see `anatomap list`)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in output=")
    p.add_argument("--overwrite", action="store_true", help="start the run folder again")
    add_quiet(p, "no progress bar (trainer.progress=false)")
    p.set_defaults(func=cmd_pretrain)


def _add_mine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap mine``."""
    p = sub.add_parser(
        "mine", help="Alice: mine cross-volume view pairs with a SAM checkpoint ahead of training"
    )
    p.add_argument("config", help="alice YAML file or packaged config name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (as for pretrain)")
    add_device(p)
    add_quiet(p, "no progress bar")
    p.set_defaults(func=cmd_mine)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap demo``."""
    p = sub.add_parser(
        "demo", help="the whole pipeline on synthetic demo scans, evaluated on unseen contrasts"
    )
    p.add_argument(
        "--out", type=Path, default=Path("demo_out"), metavar="DIR", help="everything goes here"
    )
    p.add_argument("--subjects", type=int, default=16, help="demo subjects to build")
    p.add_argument("--heldout", type=int, default=4, help="of which held out for evaluation")
    p.add_argument("--spacing", type=float, default=2.0, help="demo and cache spacing (mm)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.max_steps=50")
    p.add_argument(
        "--modalities",
        default="T1w",
        help="T1w: the synthetic demo; T1w plus template contrasts, e.g. T1w,T2w,FLAIR: the "
        "multi-modal template demo (the cache holds exactly these)",
    )
    p.add_argument("--config", default="demo", help="recipe to train (e.g. topo); runs/<name>")
    p.add_argument("--no-registration", action="store_true", help="skip registration baselines")
    p.add_argument(
        "--no-matching",
        action="store_true",
        help="skip step 6 (shipped brain-mri against rigid+affine registration)",
    )
    add_quiet(p)
    p.set_defaults(func=cmd_demo)


def _add_benchmark(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap benchmark``."""
    p = sub.add_parser(
        "benchmark", help="train and evaluate every method with one budget; one table"
    )
    p.add_argument("config", nargs="?", default="benchmark", help="benchmark YAML or name")
    p.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.max_steps=50"
    )
    p.add_argument("--quick", action="store_true", help="the CPU budget (the config's quick:)")
    p.add_argument("--methods", help="comma-separated methods (default: every registered one)")
    p.add_argument(
        "--out", type=Path, metavar="DIR", help="output folder (default: the config's output)"
    )
    add_quiet(p, "no per-method progress lines")
    p.set_defaults(func=cmd_benchmark)
