"""Turn a library of LoRA experts into a routed model: Arrow, merges, single-expert and oracle."""

from quiver.routing.arrow import (
    ArrowPrototypes,
    compute_arrow_prototypes,
    load_prototypes,
    save_prototypes,
)
from quiver.routing.elrea import ELREA
from quiver.routing.experts import ExpertSet, load_experts
from quiver.routing.model import RoutedModel, route
from quiver.routing.strategies import Arrow, Merge, Oracle, single
from quiver.routing.trace import RoutingTrace

__all__ = [
    "ELREA",
    "Arrow",
    "ArrowPrototypes",
    "ExpertSet",
    "Merge",
    "Oracle",
    "RoutedModel",
    "RoutingTrace",
    "compute_arrow_prototypes",
    "load_experts",
    "load_prototypes",
    "route",
    "save_prototypes",
    "single",
]
