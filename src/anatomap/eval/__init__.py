"""Evaluation tasks (registered on import) and the report."""

from anatomap.eval import (  # noqa: F401  (each module registers its task)
    matchers,  # "landmarks"
    position,  # "position"
    spatial,  # "spatial_aware"
)
