"""Self-supervised objectives, one module per method, registered by name."""

from anatomap.objectives import (
    alice,  # noqa: F401  (registers "alice"; needs a SAM checkpoint to mine views)
    isimed,  # noqa: F401  (registers "isimed")
    sam,  # noqa: F401  (registers "sam")
    simclr,  # noqa: F401  (baseline)
    spatial_aware,  # noqa: F401
    topo,  # noqa: F401  (registers "topo", multi-modal)
    voco,  # noqa: F401  (baseline)
)
from anatomap.objectives.base import Objective, ObjectiveParams
from anatomap.objectives.registry import (
    get_objective,
    list_objectives,
    objective_config,
    register_objective,
)

__all__ = [
    "Objective",
    "ObjectiveParams",
    "get_objective",
    "list_objectives",
    "objective_config",
    "register_objective",
]
