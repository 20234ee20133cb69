"""Dense embedding of a large volume: wall time and peak memory (``anatomap embed``'s path).

Builds the default SAM model (``configs/sam.yaml`` architecture, random weights: the cost
does not depend on the weights), embeds a random ``--size``^3 volume with the sliding window
and prints the time, the output sizes and the process's peak resident memory.

    python benchmarks/embed_memory.py --size 256
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from anatomap.infer.embed import DenseModel, embed_array
from anatomap.models.encoders import EncoderSpec, build_encoder
from anatomap.objectives.registry import get_objective, objective_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec("small_cnn", 3, 1, 64))
    obj = get_objective("sam")(objective_config({"name": "sam"}), enc)
    image = np.random.default_rng(0).random((1, *(args.size,) * 3), dtype=np.float32)
    t0 = time.perf_counter()
    emb = embed_array(DenseModel(enc, obj), image, np.eye(4), window=args.window)
    dt = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("| volume | window | coarse map | fine map | time (s) | peak RSS (GB) |")
    print("|---|---|---|---|---:|---:|")
    print(
        f"| {args.size}^3 | {args.window}^3 | {tuple(emb.coarse.shape)} | "
        f"{tuple(emb.fine.shape)} | {dt:.1f} | {peak_gb:.2f} |"
    )


if __name__ == "__main__":
    main()
