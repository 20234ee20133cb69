"""Mined view pairs: the folder format, and the dataset that cuts views around them.

Alice (Jiang et al., ICCV 2023) trains on pairs of points in two volumes that show the same
anatomy; :mod:`anatomap.infer.mining` finds them with a SAM checkpoint and writes::

    MINED/mining.json          provenance and parameters (written last: its presence = done)
    MINED/pairs.csv            subject_a, i_a, j_a, k_a, subject_b, i_b, j_b, k_b, score, tries
    MINED/embeddings/<subject>.emb.safetensors

:class:`MinedPairDataset` cuts a view around each point of a pair (or, for the same-volume
ablation, two views around the point of A), seeded per sample like
:class:`anatomap.data.sampler.LocatedViewDataset`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from anatomap.data.cache import Cache
from anatomap.data.sampler import ViewSpec, cut_view, sample_seed
from anatomap.errors import AnatomapError, ConfigError

FORMAT = "anatomap-mined-pairs"
MINING_FILE = "mining.json"
PAIRS_FILE = "pairs.csv"


class MiningError(AnatomapError):
    """Mining failed or a mined folder does not fit the run (names the folder and field)."""


@dataclass(frozen=True)
class MiningRequest:
    """What an objective asks to be mined before training (Alice: its SAM checkpoint and
    mining parameters); :func:`anatomap.infer.mining.pairs_for` carries it out."""

    checkpoint: str | Path
    out: str | Path | None = None
    pairs_per_subject: int = 32
    threshold: float = 0.7
    max_tries: int = 100
    window: int = 64


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
            "seed": torch.tensor(sample_seed(self.seed, epoch, i)),
        }
