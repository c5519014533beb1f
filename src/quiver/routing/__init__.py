"""Turn a library of LoRA experts into a routed model: Arrow (per token or per sequence), merges,
single-expert and oracle; traces of what each token used."""

from quiver.routing.arrow import (
    ArrowPrototypes,
    compute_arrow_prototypes,
    load_prototypes,
    save_prototypes,
)
from quiver.routing.context import SequenceChoice
from quiver.routing.elrea import ELREA
from quiver.routing.experts import ExpertSet, load_experts
from quiver.routing.model import RoutedModel, route
from quiver.routing.strategies import (
    Arrow,
    Granularity,
    Merge,
    Mixing,
    Oracle,
    Strategy,
    StrategyName,
    single,
)
from quiver.routing.trace import RoutingTrace

__all__ = [
    "ELREA",
    "Arrow",
    "ArrowPrototypes",
    "ExpertSet",
    "Granularity",
    "Merge",
    "Mixing",
    "Oracle",
    "RoutedModel",
    "RoutingTrace",
    "SequenceChoice",
    "Strategy",
    "StrategyName",
    "compute_arrow_prototypes",
    "load_experts",
    "load_prototypes",
    "route",
    "save_prototypes",
    "single",
]
