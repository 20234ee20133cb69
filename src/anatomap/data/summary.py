"""The summary ``anatomap data index`` prints: layout, subjects, images per modality, labels,
landmarks, what was skipped (grouped by reason) and how many files were rejected."""

from __future__ import annotations

from collections import Counter

from anatomap.data.records import IndexResult, Problem
from anatomap.data.walk import display

MAX_NAMES = 10  # label or modality names listed before "and N more"
MAX_REASONS = 8  # skip reasons listed before "and N more"


def _counts(counter: Counter[str]) -> str:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{name} {n}" for name, n in items[:MAX_NAMES])
    more = len(items) - MAX_NAMES
    return shown + (f", and {more} more name(s)" if more > 0 else "") if items else "none"


def _grouped(notes: list[Problem]) -> list[str]:
    by_reason: dict[str, list[Problem]] = {}
    for n in notes:
        by_reason.setdefault(n.reason, []).append(n)
    order = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    lines = [
        f"  {len(group)} x {reason} (e.g. {display(group[0].path)})"
        for reason, group in order[:MAX_REASONS]
    ]
    if len(order) > MAX_REASONS:
        rest = sum(len(g) for _, g in order[MAX_REASONS:])
        lines.append(f"  and {rest} more file(s) for {len(order) - MAX_REASONS} other reason(s)")
    return lines


def summary_lines(result: IndexResult) -> list[str]:
    """Lines that say what an index found, what it skipped and what it rejected."""
    subjects = result.subjects
    images = Counter(m for s in subjects for m in s.images)
    labels = Counter(n for s in subjects for n in s.labels)
    lines = []
    if result.layout_reason:
        lines.append(f"layout: {result.layout_reason}")
    participants = {s.meta.get("participant") for s in subjects if s.meta.get("session")}
    sessions = f" ({len(participants)} participant(s) with sessions)" if participants else ""
    lines += [
        f"subjects: {len(subjects)}{sessions}",
        f"images: {_counts(images)}",
        f"labels: {_counts(labels)}",
        f"landmarks: {sum(bool(s.landmarks) for s in subjects)} subject(s)",
        f"skipped: {len(result.skipped)} file(s) or folder(s)",
        *_grouped(result.skipped),
        f"rejected: {len(result.problems)} file(s)",
    ]
    return lines
