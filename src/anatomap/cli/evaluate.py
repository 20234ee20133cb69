"""``anatomap evaluate`` (with its console tables) and ``anatomap list``."""

from __future__ import annotations

import argparse
from pathlib import Path

from anatomap.cli.options import add_device, add_quiet, check_device
from anatomap.cli.report import OK
from anatomap.errors import AnatomapError


def print_position_table(metrics: dict) -> None:
    rows = metrics.get("position", {}).get("encoders", {})
    if not rows:
        return
    print(f"{'encoder':<24} {'Spearman':>9} {'R^2':>7} {'mean err mm':>12}")
    for name, m in rows.items():
        print(f"{name:<24} {m['spearman']:>9.3f} {m['r2']:>7.3f} {m['mean_error_mm']:>12.2f}")


def print_robustness_table(metrics: dict) -> None:
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


def print_landmark_table(metrics: dict) -> None:
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anatomap.eval.evaluate import evaluate

    check_device(args.device)
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
        device=args.device,
        progress=not args.quiet,
    )
    print_position_table(res.metrics)
    print_landmark_table(res.metrics)
    print_robustness_table(res.metrics)
    print(f"report: {res.report}")
    return OK


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap evaluate``."""
    p = sub.add_parser("evaluate", help="evaluate a run folder or checkpoint; write report.html")
    p.add_argument("checkpoint", type=Path, help="run folder, checkpoint folder or meta.json")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="folder for report.html, metrics.json, figures (default: RUN/eval)",
    )
    p.add_argument("--cache", type=Path, help="cache to evaluate on (default: the run's)")
    p.add_argument("--subjects", help="comma-separated subjects (default: the run's held-out)")
    p.add_argument("--crops", type=int, default=48, help="crops per subject (position task)")
    p.add_argument("--tasks", help="comma-separated tasks (default: every task that applies)")
    p.add_argument(
        "--all-tasks", action="store_true", help="also the costly opt-in tasks (segmentation)"
    )
    p.add_argument(
        "--compare", action="append", metavar="NAME=RUN", help="another checkpoint to compare"
    )
    p.add_argument("--no-registration", action="store_true", help="skip the registration baselines")
    add_device(p)
    add_quiet(p, "no progress bars")
    p.set_defaults(func=cmd_evaluate)


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
    return OK


def _add_list(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``anatomap list``."""
    p = sub.add_parser("list", help="registered objectives and encoders")
    add_quiet(p, "accepted for uniformity (list prints no progress)")
    p.set_defaults(func=cmd_list)
