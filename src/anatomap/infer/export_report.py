"""The report of a weight transfer into a MONAI network (:mod:`anatomap.infer.export`).

:class:`TransferReport` says which network tensors are pretrained and which initialised,
which encoder tensors were not transferred and why, and sums that up in a few grouped lines
(``down layers 0-3: convolutions ...``) for the CLI and ``print(report)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anatomap.errors import AnatomapError


class ExportError(AnatomapError):
    """The checkpoint cannot be exported to the asked target."""


_KIND_ORDER = ["convolutions", "residual convolutions", "norm weights", "PReLU weights"]
GOES_WITH, NOT_WITH = "goes with ", ", which did not transfer: "
"""A bias, norm or PReLU weight whose convolution did not fit: ``GOES_WITH`` + that
convolution's key + ``NOT_WITH`` + its reason."""

Describe = Callable[[str], tuple[str | None, str]]
"""Encoder key -> (part of the network, e.g. ``down layer 0``, or None; kind of tensor)."""


@dataclass
class TransferReport:
    """What a transfer copied. Every network tensor is in exactly one of ``pretrained_keys``
    and ``initialised_keys``; every encoder tensor in exactly one of ``key_map`` (copied),
    ``not_transferred`` and ``not_exported`` (both: key -> reason)."""

    network_class: str
    key_map: dict[str, str]  # encoder key -> network key, copied
    not_transferred: dict[str, str]  # encoder key -> why it was not copied
    not_exported: dict[str, str]  # encoder key -> why it is left out by design (proj.*)
    pretrained_keys: list[str]  # network keys holding encoder weights (network order)
    initialised_keys: list[str]  # the other network keys (fresh or as built)
    seed: int | None = None  # seed of the fresh initialisation (None: the caller's network)
    notes: list[str] = field(default_factory=list)
    describe: Describe = field(default=lambda key: (None, key), repr=False, compare=False)
    shape_hint: Callable[[str], str] = field(default=lambda key: "", repr=False, compare=False)

    @property
    def matched(self) -> int:
        return len(self.key_map)

    def counts(self) -> dict[str, int]:
        return {
            "network_tensors": len(self.pretrained_keys) + len(self.initialised_keys),
            "pretrained": len(self.pretrained_keys),
            "initialised": len(self.initialised_keys),
            "encoder_tensors": len(self.key_map)
            + len(self.not_transferred)
            + len(self.not_exported),
            "transferred": len(self.key_map),
            "not_transferred": len(self.not_transferred),
            "not_exported": len(self.not_exported),
        }

    def to_json(self) -> dict[str, Any]:
        """The sidecar fields of the report."""
        return {
            "pretrained_keys": self.pretrained_keys,
            "initialised_keys": self.initialised_keys,
            "key_map": self.key_map,
            "not_transferred": self.not_transferred,
            "not_exported": self.not_exported,
            "counts": self.counts(),
            "notes": self.notes,
            "matched": self.matched,
        }

    def summary_lines(self) -> list[str]:
        """Short, grouped, exact: pretrained / initialised counts, what did not transfer and
        why, what is left out by design, notes. The full lists are in the fields."""
        c = self.counts()
        fresh = "as built" if self.seed is None else f"fresh, seed {self.seed}"
        lines = [
            f"{c['pretrained']} of {c['network_tensors']} network tensors pretrained "
            f"({self._grouped(list(self.key_map))}), {c['initialised']} initialised ({fresh})"
        ]
        if self.not_transferred:
            lines.append(
                f"{n_of(c['not_transferred'], 'encoder tensor')} not transferred: "
                + self.grouped_reasons(self.not_transferred)
            )
        for why, keys in _group(self.not_exported, lambda r: r).items():
            lines.append(f"not exported: {', '.join(keys)}: {why}")
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def summary(self) -> str:
        return f"{self.network_class}: " + "\n".join(self.summary_lines())

    __str__ = summary

    def grouped_reasons(self, reasons: dict[str, str]) -> str:
        """``down layers 0-3: norm weights (no counterpart: ...); ...`` for encoder keys."""

        def base(why: str) -> str:  # a bias, norm or PReLU weight: its convolution's reason
            return why.partition(NOT_WITH)[2] if why.startswith(GOES_WITH) else why

        def label(key: str) -> str:
            why = base(reasons[key])
            if not why.startswith("shape differs"):
                return why
            hint = self.shape_hint(key)
            return f"shape differs: {hint}" if hint else "shape differs"

        groups: dict[str, list[str]] = {}
        for key in reasons:
            groups.setdefault(label(key), []).append(key)
        out = []
        for why, keys in groups.items():
            if why == "shape differs":  # no hint: a tensor's shapes as the example
                why = base(reasons[keys[0]]).replace(":", ", e.g.", 1)
            out.append(f"{self._grouped(keys)} ({why})")
        return "; ".join(out)

    def _grouped(self, keys: list[str]) -> str:
        """``down layers 0-2: all the encoder's weights; down layer 3: PReLU weights``."""
        if not keys:
            return "none"
        every: dict[str, int] = {}
        for key in [*self.key_map, *self.not_transferred]:
            part = self.describe(key)[0]
            if part is not None:
                every[part] = every.get(part, 0) + 1
        kinds: dict[str, list[str]] = {}
        count: dict[str, int] = {}
        loose = []
        for key in keys:
            part, kind = self.describe(key)
            if part is None:
                loose.append(key)
                continue
            count[part] = count.get(part, 0) + 1
            if kind not in kinds.setdefault(part, []):
                kinds[part].append(kind)
        by_kinds: dict[str, list[str]] = {}
        for part, ks in kinds.items():
            ks.sort(key=lambda k: (_KIND_ORDER.index(k) if k in _KIND_ORDER else 99, k))
            text = "all the encoder's weights" if count[part] == every[part] else _and(ks)
            by_kinds.setdefault(text, []).append(part)
        out = [f"{parts_text(parts)}: {text}" for text, parts in by_kinds.items()]
        return "; ".join(out + loose)


def _group(reasons: dict[str, str], label: Callable[[str], str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, why in reasons.items():
        out.setdefault(label(why), []).append(key)
    return out


def n_of(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def parts_text(parts: list[str]) -> str:
    """``["down layer 0", "down layer 1", "down layer 3"]`` -> ``down layers 0-1, 3``."""
    numbered: dict[str, list[int]] = {}
    other = []
    for p in parts:
        head, _, tail = p.rpartition(" ")
        if head and tail.isdigit():
            numbered.setdefault(head, []).append(int(tail))
        else:
            other.append(p)
    out = []
    for head, nums in numbered.items():
        nums = sorted(set(nums))
        runs: list[list[int]] = []
        for n in nums:
            if runs and n == runs[-1][-1] + 1:
                runs[-1].append(n)
            else:
                runs.append([n])
        text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
        out.append(f"{head}{'s' if len(nums) > 1 else ''} {text}")
    return ", ".join(out + other)
