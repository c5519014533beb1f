"""Routing strategies: small validated configs that turn stacked experts into per-module mixers.

- ``Arrow``: per-token, per-module top-k routing on exact prototypes; output mixing (as PEFT) or
  parameter mixing (as mttl); optional GenKnowSub with general experts.
- ``Merge``: one fixed combination for every token: uniform (mu, the paper's baseline) when no
  weights are given; ``single(name)`` is the merge that keeps one expert.
- ``Oracle``: the caller names the expert at run time (``routed.use_expert(name)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quiver.errors import RoutingError
from quiver.routing.arrow import (
    ARTIFACT_NAME,
    ArrowPrototypes,
    compute_arrow_prototypes,
    genknowsub,
    load_prototypes,
)
from quiver.routing.elrea import ELREA
from quiver.routing.experts import ExpertSet, ExpertSource, LoraStack, load_experts
from quiver.routing.layers import ArrowMixer, MergedMixer, OracleMixer

MIXINGS = ("outputs", "parameters")


def _check_mixing(mixing: str) -> None:
    if mixing not in MIXINGS:
        raise RoutingError(f"unknown mixing {mixing!r}", hint=f"use one of {MIXINGS}")


def stored_prototypes(source: object, experts: ExpertSet) -> ArrowPrototypes | None:
    """A library's stored prototypes (``artifact_path("arrow_prototypes")``), checked to match."""
    artifact_path = getattr(source, "artifact_path", None)
    path = artifact_path(ARTIFACT_NAME) if callable(artifact_path) else None
    if path is None or not Path(path).is_file():
        return None
    prototypes = load_prototypes(path)
    prototypes.check_matches(experts)
    return prototypes


@dataclass(frozen=True)
class Arrow:
    """Arrow routing: ``top_k`` experts per token and module, softmax at ``temperature``."""

    top_k: int = 4
    temperature: float = 1.0
    mixing: str = "outputs"
    general_experts: ExpertSource | None = None  # GenKnowSub: subtract their mean first

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise RoutingError(f"top_k must be at least 1, got {self.top_k}")
        if not self.temperature > 0:
            raise RoutingError(f"temperature must be positive, got {self.temperature}")
        _check_mixing(self.mixing)

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, nn.Module]:
        if self.top_k > len(experts.names):
            raise RoutingError(
                f"top_k={self.top_k} but the library has {len(experts.names)} experts",
                hint="choose top_k at most the number of experts",
            )
        if self.mixing == "parameters":
            experts.require_uniform_rank("parameter mixing")
        if self.general_experts is not None:
            experts = genknowsub(experts, load_experts(self.general_experts, model))
            prototypes = compute_arrow_prototypes(experts)
        else:
            prototypes = stored_prototypes(source, experts) or compute_arrow_prototypes(experts)
        return {
            module: ArrowMixer(
                stack,
                prototypes.vectors[module].to(stack.A),
                top_k=self.top_k,
                temperature=self.temperature,
                mix_parameters=self.mixing == "parameters",
            )
            for module, stack in experts.modules.items()
        }


@dataclass(frozen=True)
class Merge:
    """One fixed combination of the experts, applied to every token."""

    weights: Mapping[str, float] | None = None  # None: the uniform average (mu)
    mixing: str = "parameters"

    def __post_init__(self) -> None:
        _check_mixing(self.mixing)
        for name, weight in (self.weights or {}).items():
            if not math.isfinite(weight):
                raise RoutingError(f"merge weight of {name!r} is {weight}, not a finite number")

    def expert_weights(self, experts: ExpertSet) -> torch.Tensor:
        if self.weights is None:
            return torch.full((len(experts.names),), 1 / len(experts.names))
        weights = torch.zeros(len(experts.names))
        for name, weight in self.weights.items():
            weights[experts.index(name)] = float(weight)
        return weights

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, nn.Module]:
        weights = self.expert_weights(experts)
        if self.mixing == "parameters":
            experts.require_uniform_rank("a parameter merge")
        return {m: self._merged(s, weights) for m, s in experts.modules.items()}

    def _merged(self, stack: LoraStack, weights: torch.Tensor) -> MergedMixer:
        w = weights.to(stack.A)
        if self.mixing == "parameters":  # (sum_e w_e s_e B_e) (sum_e w_e A_e)
            lora_a = torch.einsum("e,eri->ri", w, stack.A)
            lora_b = torch.einsum("e,eor->or", w, stack.scaled_B())
        else:  # exactly sum_e w_e s_e B_e A_e: concatenate the used experts' ranks
            used = w.nonzero().flatten()
            lora_a = stack.A[used].flatten(0, 1)
            scaled = stack.scaled_B()[used] * w[used, None, None]
            lora_b = scaled.permute(1, 0, 2).flatten(1)
        return MergedMixer(lora_a, lora_b, w)


def single(expert: str) -> Merge:
    """Route every token to one expert (a merge that keeps only it)."""
    return Merge(weights={expert: 1.0}, mixing="outputs")


@dataclass(frozen=True)
class Oracle:
    """The caller names the expert at run time: ``with routed.use_expert(name): ...``."""

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, nn.Module]:
        return {m: OracleMixer(stack) for m, stack in experts.modules.items()}


STRATEGIES = {
    "arrow": Arrow,
    "uniform": Merge,
    "merge": Merge,
    "single": single,
    "oracle": Oracle,
    "elrea": ELREA,
}
