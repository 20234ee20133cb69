"""The ``anatomap`` command: data index | data cache | pretrain | evaluate | embed | match |
export | demo | list.

Every sub-command calls the Python API (``anatomap.api``). Errors that anatomap raises on
purpose are printed as one line (``anatomap: error: FILE: problem``) with exit code 2; a
command that finished but rejected some inputs exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anatomap.errors import AnatomapError


def _print_position_table(metrics: dict) -> None:
    rows = metrics.get("position", {}).get("encoders", {})
    if not rows:
        return
    print(f"{'encoder':<24} {'Spearman':>9} {'R^2':>7} {'mean err mm':>12}")
    for name, m in rows.items():
        print(f"{name:<24} {m['spearman']:>9.3f} {m['r2']:>7.3f} {m['mean_error_mm']:>12.2f}")


def _print_robustness_table(metrics: dict) -> None:
    rob = metrics.get("robustness", {})
    if not rob:
        return
    marks = rob.get("landmarks", {})
    print(
        f"\n{'encoder':<24} {'condition':<18} {'Spearman':>9} {'R^2':>7} {'err mm':>7} "
        f"{'drop':>6} {'MRE mm':>7}"
    )
    for name, conds in rob["position"].items():
        base = conds["all modalities"]["mean_error_mm"]
        for cond, m in conds.items():
            mre = marks.get(name, {}).get(cond, {}).get("mre_mm")
            print(
                f"{name:<24} {cond:<18} {m['spearman']:>9.3f} {m['r2']:>7.3f} "
                f"{m['mean_error_mm']:>7.2f} {m['mean_error_mm'] - base:>+6.2f} "
                f"{'-' if mre is None else format(mre, '.2f'):>7}"
            )


def _print_landmark_table(metrics: dict) -> None:
    rows = metrics.get("landmarks", {}).get("matchers", {})
    if not rows:
        return
    print(
        f"\n{'matcher':<24} {'MRE mm':>7} {'median':>7} {'CPM@3':>6} {'CPM@5':>6} {'CPM@10':>6} "
        f"{'s/target':>8}"
    )
    for name, m in rows.items():
        o, t = m["overall"], m["timing"]
        print(
            f"{name:<24} {o['mre_mm']:>7.2f} {o['median_mm']:>7.2f} {o['cpm@3']:>6.2f} "
            f"{o['cpm@5']:>6.2f} {o['cpm@10']:>6.2f} {t['time_per_target_s']:>8.2f}"
        )


def cmd_index(args: argparse.Namespace) -> int:
    from anatomap.data.manifest import index_directory, write_manifest

    if args.dir is None and args.table is None:
        raise AnatomapError("data index needs a folder to scan or --table CSV")
    root = args.dir if args.dir is not None else args.table.parent
    result = index_directory(
        root,
        table=args.table,
        expect_ndim=args.ndim,
        progress=not args.quiet,
        resample=args.resample,
        reference=args.reference,
    )
    write_manifest(result, args.out)
    for s in result.subjects:
        for what, why in s.resampled.items():
            print(f"resampled onto {s.reference}: {s.subject} {what}: {why}", file=sys.stderr)
    for p in result.problems:
        print(f"rejected: {p.path}: {p.reason}", file=sys.stderr)
    print(
        f"indexed {len(result.subjects)} subjects into {args.out}; "
        f"{len(result.problems)} file(s) rejected"
    )
    return 1 if result.problems else 0


def cmd_cache(args: argparse.Namespace) -> int:
    from anatomap.data.cache import build_cache

    res = build_cache(
        args.manifest,
        args.out,
        preset=args.preset,
        spacing=args.spacing,
        dtype=args.dtype,
        progress=not args.quiet,
        modalities=args.modalities.split(",") if args.modalities else None,
    )
    for p in res.problems:
        print(f"rejected: subject {p['subject']}: {p['reason']}", file=sys.stderr)
    print(
        f"cache {args.out}: {len(res.cache)} subjects ({res.built} built, {res.reused} reused), "
        f"{len(res.problems)} rejected"
    )
    return 1 if res.problems else 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from anatomap.api import config_path, load_config
    from anatomap.train.pretrain import pretrain

    path = config_path(args.config)
    cfg = load_config(path, args.overrides)
    res = pretrain(cfg, resume=args.resume, overwrite=args.overwrite, config_dir=path.parent)
    if res.is_global_zero:
        print(f"trained {res.steps} steps; checkpoint: {res.checkpoint}")
    return 0


def cmd_mine(args: argparse.Namespace) -> int:
    from anatomap.api import config_path, load_config
    from anatomap.data.cache import Cache
    from anatomap.infer.mining import pairs_for
    from anatomap.objectives.base import Objective
    from anatomap.objectives.registry import get_objective
    from anatomap.train.module import heldout_subjects

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
    mined = pairs_for(request, cache, train, cfg.trainer.seed)
    if mined is None:
        print("same-volume views without a SAM checkpoint: nothing to mine")
    else:
        i = mined.info
        print(
            f"{len(mined)} pairs ({i['failed']} dropped, mean score {i['mean_score']:.3f}) "
            f"in {mined.root}, mined with {i['sam_checkpoint']} ({i['sam_fingerprint']})"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anatomap.eval.evaluate import evaluate

    subjects = args.subjects.split(",") if args.subjects else None
    compare = {}
    for item in args.compare or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise AnatomapError(f"--compare '{item}' is not of the form NAME=RUN_OR_CHECKPOINT")
        compare[label] = path
    res = evaluate(
        args.checkpoint,
        out=args.out,
        cache=args.cache,
        subjects=subjects,
        tasks=args.tasks.split(",") if args.tasks else None,
        all_tasks=args.all_tasks,
        crops_per_subject=args.crops,
        compare=compare,
        registration=not args.no_registration,
    )
    _print_position_table(res.metrics)
    _print_landmark_table(res.metrics)
    _print_robustness_table(res.metrics)
    print(f"report: {res.report}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from anatomap.api import embed
    from anatomap.infer.embed import embedding_name

    embed(args.checkpoint, args.volumes, args.out, window=args.window, overlap=args.overlap)
    for v in args.volumes:
        print(f"{v} -> {args.out / embedding_name(v)}")
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    from anatomap.api import match

    rows = match(
        args.checkpoint,
        args.template,
        args.points,
        args.targets,
        voxel=args.voxel,
        low_score=args.low_score,
        out=args.out,
        window=args.window,
    )
    low = [r for r in rows if r["low_confidence"]]
    print(f"{len(rows)} matches written to {args.out} (and {args.out}.json)")
    for r in low:
        print(
            f"low confidence: {r['name']} in {r['target']} (score {r['score']:.2f} < "
            f"{args.low_score}): the target may not contain this anatomy",
            file=sys.stderr,
        )
    return 0


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
    )
    print()
    _print_position_table(res.evaluation.metrics)
    _print_robustness_table(res.evaluation.metrics)
    print(f"\nreport: {res.report}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anatomap.workflows.benchmark import load_benchmark_config, run_benchmark

    config, overrides = args.config, list(args.overrides)
    if "=" in config:  # `anatomap benchmark key=value`: the packaged config with an override
        config, overrides = "benchmark", [config, *overrides]
    cfg = load_benchmark_config(config, overrides, quick=args.quick)
    methods = args.methods.split(",") if args.methods else None
    page = run_benchmark(cfg, methods=methods, out=args.out)
    print((page.parent / "benchmark.md").read_text(encoding="utf-8"))
    print(f"report: {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from anatomap.infer.export import export_checkpoint

    res = export_checkpoint(
        args.checkpoint, args.to, args.out, out_channels=args.out_channels, size=args.size
    )
    print(f"{res.target}: {res.matched} encoder tensors -> {res.path} (settings: {res.sidecar})")
    for key, why in res.not_exported.items():
        print(f"not exported: {key}: {why}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from importlib import resources

    from anatomap.eval.tasks import list_tasks
    from anatomap.models import list_encoders
    from anatomap.objectives import list_objectives

    configs = sorted(
        f.name.removesuffix(".yaml")
        for f in (resources.files("anatomap") / "configs").iterdir()
        if f.name.endswith(".yaml")
    )
    print("objectives:", ", ".join(list_objectives()))
    print("encoders:  ", ", ".join(list_encoders()))
    print("eval tasks:", ", ".join(list_tasks()))
    print("configs:   ", ", ".join(configs))
    return 0


def _add_data(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap data index`` and ``anatomap data cache``."""
    data = sub.add_parser("data", help="index and cache scans")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("index", help="find and validate scans; write a JSONL manifest")
    p.add_argument("dir", type=Path, nargs="?", help="folder to scan (not needed with --table)")
    p.add_argument("--out", type=Path, required=True, help="manifest.jsonl to write")
    p.add_argument("--table", type=Path, help="CSV subject,modality,path[,kind] instead of names")
    p.add_argument("--ndim", type=int, default=3, choices=(2, 3), help="expected dimensionality")
    p.add_argument(
        "--resample",
        action="store_true",
        help="keep a subject's files on another grid; the cache resamples them onto the "
        "reference modality's grid (default: reject them)",
    )
    p.add_argument("--reference", help="reference modality (default: first by name)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_index)

    p = dsub.add_parser("cache", help="preprocess a manifest into a memory-mapped cache")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--preset", default="mri", help="ct | mri | none, or per modality: T1w=mri,CT=ct"
    )
    p.add_argument("--spacing", type=float, default=1.5, help="target isotropic spacing (mm)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument(
        "--modalities",
        help="comma-separated channels of the cache, in order (default: every modality); "
        "e.g. T1w for a single-modality recipe",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cache)


def _add_pretrain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap pretrain``."""
    p = sub.add_parser("pretrain", help="train a config: pretrain CONFIG [key=value ...]")
    p.add_argument("config", help="YAML file or packaged config name (see `anatomap list`)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in output=")
    p.add_argument("--overwrite", action="store_true", help="start the run folder again")
    p.set_defaults(func=cmd_pretrain)


def _add_mine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap mine``."""
    p = sub.add_parser(
        "mine", help="Alice: mine cross-volume view pairs with a SAM checkpoint ahead of training"
    )
    p.add_argument("config", help="alice YAML file or packaged config name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides (as for pretrain)")
    p.set_defaults(func=cmd_mine)


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap evaluate``."""
    p = sub.add_parser("evaluate", help="evaluate a run folder or checkpoint; write report.html")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--cache", type=Path, help="cache to evaluate on (default: the run's)")
    p.add_argument("--subjects", help="comma-separated subjects (default: the run's held-out)")
    p.add_argument("--crops", type=int, default=48, help="crops per subject")
    p.add_argument("--tasks", help="comma-separated tasks (default: every task that applies)")
    p.add_argument(
        "--all-tasks", action="store_true", help="also the costly opt-in tasks (segmentation)"
    )
    p.add_argument(
        "--compare", action="append", metavar="NAME=RUN", help="another checkpoint to compare"
    )
    p.add_argument("--no-registration", action="store_true", help="skip the registration baselines")
    p.set_defaults(func=cmd_evaluate)


def _add_embed(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap embed``."""
    p = sub.add_parser(
        "embed", help="dense embeddings of whole scans (dense checkpoints, e.g. sam)"
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument("volumes", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="folder for <name>.emb.safetensors")
    p.add_argument("--window", type=int, default=64, help="sliding-window edge (voxels)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.set_defaults(func=cmd_embed)


def _add_match(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap match``."""
    p = sub.add_parser("match", help="find template points in target scans")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("targets", type=Path, nargs="+", help="scans or saved .emb.safetensors")
    p.add_argument("--template", type=Path, required=True, help="scan or saved embedding")
    p.add_argument("--points", type=Path, required=True, help="CSV: name,x,y,z (or i,j,k)")
    p.add_argument("--voxel", action="store_true", help="points are template voxel indices")
    p.add_argument("--out", type=Path, default=Path("matches.csv"))
    p.add_argument("--low-score", type=float, default=0.5, help="flag matches below this")
    p.add_argument("--window", type=int, default=64)
    p.set_defaults(func=cmd_match)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap demo``."""
    p = sub.add_parser("demo", help="the whole pipeline on the embedded demo data")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--subjects", type=int, default=16, help="demo subjects to build")
    p.add_argument("--heldout", type=int, default=4, help="of which held out for evaluation")
    p.add_argument("--spacing", type=float, default=2.0, help="demo and cache spacing (mm)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.max_steps=50")
    p.add_argument(
        "--modalities",
        default="T1w",
        help="T1w plus synthetic contrasts, e.g. T1w,T2w,FLAIR (multi-modal demo; the cache "
        "holds exactly these)",
    )
    p.add_argument("--config", default="demo", help="recipe to train (e.g. topo); runs/<name>")
    p.add_argument("--no-registration", action="store_true", help="skip registration baselines")
    p.add_argument("--quiet", action="store_true")
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
    p.add_argument("--out", type=Path, help="output folder (default: the config's output)")
    p.set_defaults(func=cmd_benchmark)


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap export``."""
    p = sub.add_parser(
        "export", help="a checkpoint's encoder as a MONAI UNet/SwinUNETR or TorchScript file"
    )
    p.add_argument("checkpoint", type=Path, help="run folder or checkpoint folder")
    p.add_argument("--to", required=True, choices=("monai-unet", "swinunetr", "torchscript"))
    p.add_argument("--out", type=Path, required=True, help="FILE (.safetensors or .pt)")
    p.add_argument(
        "--out-channels",
        type=int,
        help="network output channels (monai-unet: a multiple of num_groups, default "
        "num_groups; swinunetr: default 2)",
    )
    p.add_argument("--size", type=int, help="torchscript: edge of the tracing input (voxels)")
    p.set_defaults(func=cmd_export)


def _add_list(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap list``."""
    p = sub.add_parser("list", help="registered objectives and encoders")
    p.set_defaults(func=cmd_list)


_COMMANDS = (
    _add_data,
    _add_pretrain,
    _add_mine,
    _add_evaluate,
    _add_embed,
    _add_match,
    _add_demo,
    _add_benchmark,
    _add_export,
    _add_list,
)
"""One function per sub-command, in the order ``anatomap --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``anatomap`` argument parser: one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="anatomap", description="Self-supervised anatomical position learning."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand on either side of options (``pretrain CFG --resume a=1 b=2``).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from anatomap import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except AnatomapError as exc:
        print(f"anatomap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anatomap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
