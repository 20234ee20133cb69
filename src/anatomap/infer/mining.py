"""Alice's cross-volume view pairs mined with a SAM checkpoint (Jiang et al., ICCV 2023).

For a random foreground point of volume A, the SAM model finds the matching point in another
volume B (coarse-to-fine matching, :func:`anatomap.infer.match.match_points`); the pair is
kept when the match score reaches ``threshold`` (default 0.7), trying up to ``max_tries``
points. Every subject is embedded once (:func:`anatomap.infer.embed.embed_array` on the
cached array) and the embedding is stored next to the pairs, so nothing is recomputed at
training time. The folder format and the dataset that reads it are in
:mod:`anatomap.data.pairs`; ``pretrain`` and ``anatomap mine`` call :func:`pairs_for`.

Embedding and matching run on ``device`` (:func:`anatomap.infer.device.resolve_device`; auto:
a GPU when there is one, with bf16 autocast on CUDA; MPS embeds there and matches on the CPU,
whose float64 geometry MPS lacks); ``progress`` is a tqdm bar over the subjects on stderr.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anatomap import geometry
from anatomap.checkpoint import resolve_checkpoint
from anatomap.data.cache import Cache
from anatomap.data.pairs import (
    FORMAT,
    MINING_FILE,
    PAIRS_FILE,
    MinedPairs,
    MiningError,
    MiningRequest,
)
from anatomap.infer.device import resolve_device
from anatomap.infer.embed import EMBEDDING_SUFFIX, DenseEmbedding, DenseModel, embed_array
from anatomap.infer.match import match_points
from anatomap.io.atomic import atomic_path, atomic_write_json

# The fields that must agree for a mined folder to be reused.
_KEY_FIELDS = (
    "sam_fingerprint",
    "cache_fingerprint",
    "subjects",
    "pairs_per_subject",
    "threshold",
    "max_tries",
    "seed",
    "window",
)


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint's ``model.safetensors``."""
    path = resolve_checkpoint(checkpoint) / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def mining_params(
    pairs_per_subject: int = 32,
    threshold: float = 0.7,
    max_tries: int = 100,
    seed: int = 0,
    window: int = 64,
) -> dict[str, Any]:
    return {
        "pairs_per_subject": int(pairs_per_subject),
        "threshold": float(threshold),
        "max_tries": int(max_tries),
        "seed": int(seed),
        "window": int(window),
    }


def default_mining_dir(
    checkpoint: str | Path, cache: Cache, subjects: list[str], **params: Any
) -> Path:
    """``<SAM run>/mined/<hash of checkpoint, cache, subjects and parameters>``."""
    ckpt = resolve_checkpoint(checkpoint)
    key = {
        "sam_fingerprint": checkpoint_fingerprint(ckpt),
        "cache_fingerprint": cache.fingerprint(),
        "subjects": sorted(subjects),
        **mining_params(**params),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return ckpt.parent / "mined" / digest


class _EmbeddingStore:
    """Per-subject dense embeddings: computed once (on ``device``), saved, re-read lazily (a
    few in memory)."""

    def __init__(
        self,
        model: Any,
        cache: Cache,
        folder: Path,
        fingerprint: str,
        window: int,
        device: torch.device,
    ) -> None:
        self.model, self.cache, self.folder = model, cache, folder
        self.fingerprint, self.window, self.device = fingerprint, window, device
        # matching is float64 geometry, which MPS lacks: there it matches on the CPU
        self.match_device = device if device.type != "mps" else torch.device("cpu")
        self._mem: OrderedDict[str, Any] = OrderedDict()

    def path(self, subject: str) -> Path:
        return self.folder / f"{subject}{EMBEDDING_SUFFIX}"

    def ensure(self, subject: str) -> None:
        p = self.path(subject)
        if p.is_file():
            emb = DenseEmbedding.load(p)
            if emb.meta.get("sam_fingerprint") == self.fingerprint:
                return
        s = self.cache[subject]
        image = np.asarray(s.image, np.float32)
        emb = embed_array(self.model, image, s.affine, window=self.window, device=self.device)
        emb.source = subject
        emb.meta["sam_fingerprint"] = self.fingerprint
        emb.save(p)

    def get(self, subject: str) -> Any:
        if subject in self._mem:
            self._mem.move_to_end(subject)
            return self._mem[subject]
        self.ensure(subject)
        emb = DenseEmbedding.load(self.path(subject))
        self._mem[subject] = emb
        while len(self._mem) > 4:
            self._mem.popitem(last=False)
        return emb


def _mine_rows(
    store: _EmbeddingStore,
    cache: Cache,
    subjects: list[str],
    params: dict[str, Any],
    progress: bool,
) -> tuple[list[list[Any]], int]:
    """The pairs.csv rows of every subject as volume A, and how many pairs found no match."""
    from tqdm.auto import tqdm

    seed, threshold, max_tries = params["seed"], params["threshold"], params["max_tries"]
    rows: list[list[Any]] = []
    failed = 0
    with tqdm(
        subjects, desc="mining", unit="subject", file=sys.stderr, disable=not progress
    ) as bar:
        for ai, a in enumerate(bar):
            sa = cache[a]
            fg = sa.foreground
            if fg is None or not len(fg):
                fg = np.argwhere(np.ones(sa.shape, bool))
            others = [s for s in subjects if s != a]
            for k in range(params["pairs_per_subject"]):
                rng = np.random.default_rng([seed, ai, k])
                b = others[int(rng.integers(len(others)))]
                ijk_a = fg[rng.integers(len(fg), size=max_tries)].astype(np.float64)
                world_a = geometry.voxel_to_world(sa.affine, ijk_a)
                res = match_points(store.get(a), world_a, store.get(b), device=store.match_device)
                ok = np.flatnonzero(res.scores >= threshold)
                if not len(ok):
                    failed += 1
                    continue
                t = int(ok[0])
                sb = cache[b]
                ijk_b = geometry.world_to_voxel(sb.affine, res.points_mm[t : t + 1])[0]
                ijk_b = np.clip(ijk_b, 0, np.asarray(sb.shape) - 1)
                score = float(res.scores[t])
                rows.append([a, *ijk_a[t].tolist(), b, *np.round(ijk_b, 3).tolist(), score, t + 1])
            bar.set_postfix(pairs=len(rows), unmatched=failed)
    return rows, failed


def mine_pairs(
    cache: Cache,
    subjects: list[str],
    checkpoint: str | Path,
    out: str | Path,
    *,
    pairs_per_subject: int = 32,
    threshold: float = 0.7,
    max_tries: int = 100,
    seed: int = 0,
    window: int = 64,
    progress: bool = False,
    device: str | torch.device = "auto",
) -> MinedPairs:
    """Mine ``pairs_per_subject`` pairs with every subject of ``subjects`` as volume A.

    Each pair: a random other subject B, up to ``max_tries`` random foreground points of A
    matched in B at once; the first whose score reaches ``threshold`` is kept (a pair with no
    such point is dropped and counted). Writes ``out`` (see the module docstring). ``device``:
    auto, cpu, cuda, cuda:N or mps (one this machine lacks: one error line, before any work).
    """
    dev = resolve_device(device)
    out = Path(out)
    subjects = sorted(subjects)
    if len(subjects) < 2:
        raise MiningError(f"{out}: cross-volume mining needs at least two subjects")
    ckpt = resolve_checkpoint(checkpoint)
    model = DenseModel.from_checkpoint(ckpt)
    fp = checkpoint_fingerprint(ckpt)
    trained_spacing = model.meta.get("data", {}).get("spacing")
    if (
        trained_spacing is not None
        and cache.spacing is not None
        and not np.allclose(np.atleast_1d(trained_spacing), np.atleast_1d(cache.spacing))
    ):
        raise MiningError(
            f"{ckpt}: SAM checkpoint trained at spacing {trained_spacing} mm but cache "
            f"{cache.root} has spacing {cache.spacing} mm; mine with a matching checkpoint"
        )
    params = mining_params(pairs_per_subject, threshold, max_tries, seed, window)
    store = _EmbeddingStore(model, cache, out / "embeddings", fp, window, dev)
    rows, failed = _mine_rows(store, cache, subjects, params, progress)
    if not rows:
        raise MiningError(
            f"{out}: no pair reached similarity {threshold} in {max_tries} tries; lower "
            "objective.mine_threshold or train the SAM checkpoint longer"
        )
    with (
        atomic_path(out / PAIRS_FILE, what="mined pairs") as tmp,
        open(tmp, "w", newline="") as fh,
    ):
        w = csv.writer(fh)
        w.writerow(
            ["subject_a", "i_a", "j_a", "k_a", "subject_b", "i_b", "j_b", "k_b", "score", "tries"]
        )
        w.writerows(rows)
    scores = np.asarray([r[-2] for r in rows])
    info = {
        "format": FORMAT,
        "version": 1,
        "sam_checkpoint": str(ckpt.resolve()),
        "sam_fingerprint": fp,
        "sam_step": model.meta.get("step"),
        "cache": str(cache.root.resolve()),
        "cache_fingerprint": cache.fingerprint(),
        "subjects": subjects,
        **params,
        "pairs": len(rows),
        "failed": failed,
        "mean_score": float(scores.mean()),
        "mean_tries": float(np.mean([r[-1] for r in rows])),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / MINING_FILE, info)
    return MinedPairs.load(out)


def load_or_mine(
    cache: Cache,
    subjects: list[str],
    checkpoint: str | Path,
    out: str | Path | None = None,
    **kwargs: Any,
) -> MinedPairs:
    """Reuse a mined folder made by the same checkpoint, cache, subjects and parameters; mine
    when there is none. A folder made otherwise is an error naming the field that differs.
    ``progress`` and ``device`` (see :func:`mine_pairs`) do not change what is mined, so they
    are not part of that key."""
    progress = bool(kwargs.pop("progress", False))
    device = kwargs.pop("device", "auto")
    resolve_device(device)  # checked even when the pairs are read back
    params = mining_params(**kwargs)
    out = Path(out) if out else default_mining_dir(checkpoint, cache, subjects, **params)
    if (out / MINING_FILE).is_file():
        mined = MinedPairs.load(out)
        want = {
            "sam_fingerprint": checkpoint_fingerprint(checkpoint),
            "cache_fingerprint": cache.fingerprint(),
            "subjects": sorted(subjects),
            **params,
        }
        for key in _KEY_FIELDS:
            if mined.info.get(key) != want[key]:
                raise MiningError(
                    f"{out}: mined with {key}={mined.info.get(key)!r}, this run needs "
                    f"{want[key]!r}; delete the folder or choose another objective.mining_dir"
                )
        return mined
    return mine_pairs(cache, subjects, checkpoint, out, progress=progress, device=device, **params)


def pairs_for(
    request: MiningRequest | None,
    cache: Cache,
    subjects: list[str],
    seed: int,
    progress: bool = True,
    device: str | torch.device = "auto",
) -> MinedPairs | None:
    """Mine (or read back) the pairs an objective asked for (``None``: nothing to mine).
    ``pretrain`` and ``anatomap mine`` both call this; the objective only consumes pairs.
    ``device``: where the SAM checkpoint embeds and matches (see :func:`mine_pairs`)."""
    if request is None:
        return None
    return load_or_mine(
        cache,
        subjects,
        request.checkpoint,
        request.out,
        pairs_per_subject=request.pairs_per_subject,
        threshold=request.threshold,
        max_tries=request.max_tries,
        seed=seed,
        window=request.window,
        progress=progress,
        device=device,
    )
