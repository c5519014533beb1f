"""``route()``: wrap a base model's LoRA-targeted layers so a library of experts drives them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from quiver.errors import RoutingError
from quiver.routing.experts import ExpertSource, expert_index, load_experts
from quiver.routing.layers import OracleMixer, RoutedLinear
from quiver.routing.strategies import STRATEGIES, Strategy, StrategyName
from quiver.routing.trace import RoutingTrace


class RoutedModel(nn.Module):
    """A causal LM whose targeted layers route over experts; ``forward``/``generate`` as usual."""

    def __init__(self, model: nn.Module, expert_names: tuple[str, ...], strategy: Strategy) -> None:
        super().__init__()
        self.model = model
        self.expert_names = expert_names
        self.strategy = strategy

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def routed_layers(self) -> dict[str, RoutedLinear]:
        return {m.name: m for m in self.model.modules() if isinstance(m, RoutedLinear)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    @contextmanager
    def trace(self) -> Iterator[RoutingTrace]:
        """Record every routed module's per-token expert weights while the block runs."""
        trace = RoutingTrace(self.expert_names)
        layers = self.routed_layers.values()
        for layer in layers:
            layer.recorder = trace.record
        try:
            yield trace
        finally:
            for layer in layers:
                layer.recorder = None

    @contextmanager
    def use_expert(self, names: str | Sequence[str]) -> Iterator[RoutedModel]:
        """Oracle routing: send all rows (one name) or each batch row (one name per row) to it."""
        mixers = [m.mixer for m in self.routed_layers.values() if isinstance(m.mixer, OracleMixer)]
        if not mixers:
            raise RoutingError(
                "use_expert() needs a model routed with strategy='oracle'",
                hint="route(model, experts, strategy='oracle')",
            )
        names = [names] if isinstance(names, str) else list(names)
        rows = torch.tensor([expert_index(self.expert_names, name) for name in names])
        for mixer in mixers:
            mixer.rows = rows
        try:
            yield self
        finally:
            for mixer in mixers:
                mixer.rows = None

    def unroute(self) -> nn.Module:
        """Put the original layers back and return the plain base model."""
        for name, layer in self.routed_layers.items():
            _replace(self.model, name, layer.base_layer)
        return self.model


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def route(
    model: nn.Module,
    experts: ExpertSource,
    strategy: StrategyName | Strategy = "arrow",
    **options: Any,
) -> RoutedModel:
    """Route ``model`` over ``experts`` (a library, a ``name -> folder`` mapping or folders).

    ``strategy`` is a name (``"arrow"``, ``"uniform"``, ``"merge"``, ``"single"``, ``"oracle"``)
    with its options as keywords, e.g. ``route(model, lib, "arrow", top_k=4)``, or a strategy
    object such as ``Arrow(top_k=4, mixing="parameters")``. The model's layers are wrapped in
    place; ``RoutedModel.unroute()`` restores them.
    """
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise RoutingError(f"unknown strategy {strategy!r}", hint=f"use one of {[*STRATEGIES]}")
        try:
            strategy = STRATEGIES[strategy](**options)
        except TypeError as error:
            raise RoutingError(f"bad options for strategy {strategy!r}: {error}") from error
    elif not isinstance(strategy, Strategy):
        raise RoutingError(
            f"strategy must be a name or a strategy object, got {type(strategy).__name__}",
            hint=f"use one of {[*STRATEGIES]} or an object with build(), such as Arrow()",
        )
    elif options:
        raise RoutingError(
            f"options {sorted(options)} given with a strategy object",
            hint="set them on the strategy object instead",
        )
    if any(isinstance(m, RoutedLinear) for m in model.modules()):
        raise RoutingError("this model is already routed", hint="call .unroute() on it first")
    expert_set = load_experts(experts, model)
    for name, mixer in strategy.build(expert_set, model, experts).items():
        _replace(model, name, RoutedLinear(model.get_submodule(name), name, mixer))
    return RoutedModel(model, expert_set.names, strategy)
