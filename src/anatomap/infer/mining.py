"""Cross-volume view pairs mined with a SAM checkpoint (Alice, Jiang et al., ICCV 2023).

For a random foreground point of volume A, the SAM model finds the matching point in another
volume B (coarse-to-fine matching, :func:`anatomap.infer.match.match_points`); the pair is
kept when the match score reaches ``threshold`` (default 0.7), trying up to ``max_tries``
points. Every subject is embedded once (:func:`anatomap.infer.embed.embed_array` on the
cached array) and the embedding is stored next to the pairs, so nothing is recomputed at
training time. The folder records which checkpoint made it (path + SHA-256 of its weights)
and which cache (fingerprint)::

    MINED/mining.json          provenance and parameters (written last: its presence = done)
    MINED/pairs.csv            subject_a, i_a, j_a, k_a, subject_b, i_b, j_b, k_b, score, tries
    MINED/embeddings/<subject>.emb.safetensors

:class:`MinedPairDataset` cuts a view around each point of a pair (or, for the same-volume
ablation, two views around the point of A), seeded per sample like
:class:`anatomap.data.sampler.LocatedViewDataset`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from anatomap import geometry
from anatomap.data.cache import Cache, atomic_write_json
from anatomap.data.sampler import ViewSpec, cut_view
from anatomap.errors import AnatomapError, ConfigError

FORMAT = "anatomap-mined-pairs"
MINING_FILE = "mining.json"
PAIRS_FILE = "pairs.csv"
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


class MiningError(AnatomapError):
    """Mining failed or a mined folder does not fit the run (names the folder and field)."""


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint's ``model.safetensors``."""
    from anatomap.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint) / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class MinedPairs:
    """Mined point pairs (voxel indices in each subject's cached array) and provenance."""

    root: Path
    info: dict[str, Any]
    subject_a: list[str]
    voxel_a: np.ndarray
    subject_b: list[str]
    voxel_b: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.subject_a)

    @classmethod
    def load(cls, root: str | Path) -> MinedPairs:
        root = Path(root)
        try:
            info = json.loads((root / MINING_FILE).read_text())
            with open(root / PAIRS_FILE, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, ValueError) as exc:
            raise MiningError(f"{root}: not a mined-pairs folder ({exc})") from None
        if info.get("format") != FORMAT:
            raise MiningError(f"{root / MINING_FILE}: not an anatomap mined-pairs file")

        def vox(r: dict[str, str], s: str) -> list[float]:
            return [float(r[f"{k}_{s}"]) for k in ("i", "j", "k")]

        return cls(
            root,
            info,
            [r["subject_a"] for r in rows],
            np.asarray([vox(r, "a") for r in rows], np.float64).reshape(-1, 3),
            [r["subject_b"] for r in rows],
            np.asarray([vox(r, "b") for r in rows], np.float64).reshape(-1, 3),
            np.asarray([float(r["score"]) for r in rows], np.float64),
        )


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
    from anatomap.checkpoint import resolve_checkpoint

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
    """Per-subject dense embeddings: computed once, saved, re-read lazily (a few in memory)."""

    def __init__(self, model: Any, cache: Cache, folder: Path, fingerprint: str, window: int):
        self.model, self.cache, self.folder = model, cache, folder
        self.fingerprint, self.window = fingerprint, window
        self._mem: OrderedDict[str, Any] = OrderedDict()

    def path(self, subject: str) -> Path:
        from anatomap.infer.embed import EMBEDDING_SUFFIX

        return self.folder / f"{subject}{EMBEDDING_SUFFIX}"

    def ensure(self, subject: str) -> None:
        from anatomap.infer.embed import DenseEmbedding, embed_array

        p = self.path(subject)
        if p.is_file():
            emb = DenseEmbedding.load(p)
            if emb.meta.get("sam_fingerprint") == self.fingerprint:
                return
        s = self.cache[subject]
        emb = embed_array(self.model, np.asarray(s.image, np.float32), s.affine, window=self.window)
        emb.source = subject
        emb.meta["sam_fingerprint"] = self.fingerprint
        emb.save(p)

    def get(self, subject: str) -> Any:
        from anatomap.infer.embed import DenseEmbedding

        if subject in self._mem:
            self._mem.move_to_end(subject)
            return self._mem[subject]
        self.ensure(subject)
        emb = DenseEmbedding.load(self.path(subject))
        self._mem[subject] = emb
        while len(self._mem) > 4:
            self._mem.popitem(last=False)
        return emb


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
) -> MinedPairs:
    """Mine ``pairs_per_subject`` pairs with every subject of ``subjects`` as volume A.

    Each pair: a random other subject B, up to ``max_tries`` random foreground points of A
    matched in B at once; the first whose score reaches ``threshold`` is kept (a pair with no
    such point is dropped and counted). Writes ``out`` (see the module docstring).
    """
    from anatomap.checkpoint import resolve_checkpoint
    from anatomap.infer.embed import DenseModel
    from anatomap.infer.match import match_points

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
    store = _EmbeddingStore(model, cache, out / "embeddings", fp, window)
    rows: list[list[Any]] = []
    failed = 0
    for ai, a in enumerate(subjects):
        sa = cache[a]
        fg = sa.foreground
        if fg is None or not len(fg):
            fg = np.argwhere(np.ones(sa.shape, bool))
        others = [s for s in subjects if s != a]
        for k in range(pairs_per_subject):
            rng = np.random.default_rng([seed, ai, k])
            b = others[int(rng.integers(len(others)))]
            ijk_a = fg[rng.integers(len(fg), size=max_tries)].astype(np.float64)
            world_a = geometry.voxel_to_world(sa.affine, ijk_a)
            res = match_points(store.get(a), world_a, store.get(b))
            ok = np.flatnonzero(res.scores >= threshold)
            if not len(ok):
                failed += 1
                continue
            t = int(ok[0])
            sb = cache[b]
            ijk_b = geometry.world_to_voxel(sb.affine, res.points_mm[t : t + 1])[0]
            ijk_b = np.clip(ijk_b, 0, np.asarray(sb.shape) - 1)
            rows.append(
                [
                    a,
                    *ijk_a[t].tolist(),
                    b,
                    *np.round(ijk_b, 3).tolist(),
                    float(res.scores[t]),
                    t + 1,
                ]
            )
        if progress:
            print(f"mined {a}: {len(rows)} pairs so far, {failed} without a match >= {threshold}")
    if not rows:
        raise MiningError(
            f"{out}: no pair reached similarity {threshold} in {max_tries} tries; lower "
            "objective.mine_threshold or train the SAM checkpoint longer"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PAIRS_FILE}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["subject_a", "i_a", "j_a", "k_a", "subject_b", "i_b", "j_b", "k_b", "score", "tries"]
        )
        w.writerows(rows)
    tmp.replace(out / PAIRS_FILE)
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
    when there is none. A folder made otherwise is an error naming the field that differs."""
    progress = bool(kwargs.pop("progress", False))
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
    return mine_pairs(cache, subjects, checkpoint, out, progress=progress, **params)


class MinedPairDataset(Dataset):
    """Two located views per sample: around the two points of a mined pair (cross-volume), or
    both around the point of A in A (``cross_volume=False``, the same-volume ablation; with
    ``pairs=None`` the point is a random foreground voxel of a training subject).

    Index ``epoch * samples_per_epoch + i`` is seeded by ``(seed, epoch, i)``; pairs are
    visited in a fresh permutation per round. Each view gets its own scale jitter and
    intensity augmentation from ``spec``.
    """

    def __init__(
        self,
        cache: Cache,
        subjects: list[str],
        spec: ViewSpec,
        samples_per_epoch: int,
        seed: int = 0,
        pairs: MinedPairs | None = None,
        cross_volume: bool = True,
    ) -> None:
        if len(spec.size) != 3:
            raise ConfigError("mined view pairs are 3-D (model.spatial_dims: 3)")
        if not subjects:
            raise ConfigError("no subjects to sample from (all held out, or an empty cache)")
        if cross_volume and pairs is None:
            raise ConfigError("cross-volume views need mined pairs (objective.sam_checkpoint)")
        self.cache, self.spec = cache, spec
        self.subjects = list(subjects)
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.cross_volume = cross_volume
        self.pairs = pairs
        if pairs is not None:
            train = set(subjects)
            self.index = [
                n
                for n in range(len(pairs))
                if pairs.subject_a[n] in train and pairs.subject_b[n] in train
            ]
            if not self.index:
                raise MiningError(f"{pairs.root}: no mined pair between training subjects")

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _centres(self, epoch: int, i: int, rng: np.random.Generator):
        if self.pairs is None:
            n = len(self.subjects)
            perm = np.random.default_rng([self.seed, epoch, i // n, 7]).permutation(n)
            sid = self.subjects[perm[i % n]]
            s = self.cache[sid]
            fg = s.foreground
            if fg is not None and len(fg):
                c = fg[rng.integers(len(fg))].astype(np.float64)
            else:
                c = rng.uniform(0, np.asarray(s.shape, np.float64) - 1)
            return (sid, c), (sid, c)
        n = len(self.index)
        perm = np.random.default_rng([self.seed, epoch, i // n, 7]).permutation(n)
        p = self.index[perm[i % n]]
        a = (self.pairs.subject_a[p], self.pairs.voxel_a[p])
        b = (self.pairs.subject_b[p], self.pairs.voxel_b[p]) if self.cross_volume else a
        return a, b

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(int(index), self.samples_per_epoch)
        rng = np.random.default_rng([self.seed, epoch, i])
        out_shape = np.asarray(self.spec.size, int)
        images, affines, present, names = [], [], [], []
        for sid, centre in self._centres(epoch, i, rng):
            s = self.cache[sid]
            scale = rng.uniform(*self.spec.scale, size=3)
            src = np.maximum(np.round(out_shape * scale).astype(int), 1)
            img, aff = cut_view(s, np.asarray(centre), src, out_shape, self.spec.pad_value)
            if self.spec.intensity is not None:
                img = self.spec.intensity.apply(img, rng)
            images.append(img)
            affines.append(aff)
            present.append(s.present)
            names.append(sid)
        return {
            "image": torch.from_numpy(np.stack(images)),
            "affine": torch.from_numpy(np.stack(affines)),
            "modality_mask": torch.from_numpy(np.logical_and(*present).copy()),
            "subject": names[0] if names[0] == names[1] else f"{names[0]}>{names[1]}",
        }
