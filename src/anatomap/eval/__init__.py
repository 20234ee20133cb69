"""Evaluation tasks (registered on import) and the report."""

from anatomap.eval import (  # noqa: F401  (each module registers its task)
    landmarks_task,  # "landmarks"
    position,  # "position"
    robustness,  # "robustness" (multi-modal caches)
    spatial,  # "spatial_aware"
)

# isort: split
from anatomap.eval import health, region, segmentation  # noqa: F401  (downstream tasks)
