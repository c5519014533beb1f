"""Routing strategies: small validated configs that turn stacked experts into per-module mixers.

- ``Arrow``: per-token, per-module top-k routing on exact prototypes (the paper's, as PEFT); or,
  with ``granularity="sequence"``, one top-k choice per sequence from its prompt, kept for the
  whole generation. Output mixing (as PEFT) or parameter mixing (as mttl); optional GenKnowSub.
- ``Merge``: one fixed combination for every token: uniform (mu, the paper's baseline) when no
  weights are given; ``single(name)`` is the merge that keeps one expert.
- ``Oracle``: the caller names the expert at run time (``routed.use_expert(name)``).
- ``Base``: no expert at all (the base model; for ``routed.using("base")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args, runtime_checkable

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
from quiver.routing.context import SequenceChoice, check_selection
from quiver.routing.elrea import ELREA
from quiver.routing.experts import ExpertSet, ExpertSource, LoraStack, load_experts
from quiver.routing.layers import ArrowMixer, MergedMixer, Mixer, OracleMixer, SequenceArrowMixer
from quiver.routing.trace import layer_of

Mixing = Literal["outputs", "parameters"]
"""How k chosen experts combine: ``outputs`` adds ``w_j B_j A_j x`` (as PEFT); ``parameters``
mixes the factors first, ``(sum w_j B_j)(sum w_j A_j) x`` (as mttl)."""
Granularity = Literal["token", "sequence"]
"""What Arrow routes: each token at each module (the paper), or each sequence once, by its
prompt's prototype scores summed over the modules."""
StrategyName = Literal["arrow", "uniform", "merge", "single", "oracle", "base", "elrea"]


@runtime_checkable
class Strategy(Protocol):
    """What ``route()`` needs from a strategy: for every routed module, the mixer that decides
    which experts each token uses and adds their update (Arrow, Merge, Oracle, ...)."""

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, Mixer]:
        """Mixers for ``experts`` (stacked and cast to the model), keyed by module name;
        ``source`` is what the experts came from (a library may hold stored artifacts)."""
        ...


def _check_mixing(mixing: str) -> None:
    if mixing not in get_args(Mixing):
        raise RoutingError(f"unknown mixing {mixing!r}", hint=f"use one of {get_args(Mixing)}")


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
    """Arrow routing: ``top_k`` experts, softmax of their scores at ``temperature``.

    ``granularity="token"`` (default, the paper's and PEFT's): per token and module, by
    ``|x . p_e|`` at that module. ``"sequence"``: once per batch row, by its prompt: at every
    module the mean of ``|x . p_e|`` over the prompt's tokens (padding masked) on a no-expert
    pass, normalised to sum to 1 over the experts, summed over the modules; the row keeps those
    experts and weights at every module for the whole generation.

    ``ignore_token_ids`` (sequence granularity only): prompt positions holding these tokens are
    not scored. Pass the chat template's tokens (e.g. ``tokenizer.all_special_ids``): every
    prompt shares them, so they say nothing about the task, yet they add the same bias towards
    some expert to every prompt's scores (in the toy world it sent most prompts to one expert).

    ``prompt_layers`` (sequence granularity only): the blocks (layer numbers, 0 first) whose
    modules score the prompt; None: every module. The first block's inputs are closest to the
    prompt's tokens: in the toy world, scoring block 0 alone sent 94% of training prompts to
    their cluster's MBC expert, against 42% for all four blocks (README, Toy world).
    """

    top_k: int = 4
    temperature: float = 1.0
    mixing: Mixing = "outputs"
    general_experts: ExpertSource | None = None  # GenKnowSub: subtract their mean first
    granularity: Granularity = "token"
    ignore_token_ids: tuple[int, ...] = ()
    prompt_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_selection(self.top_k, self.temperature, all_allowed=False)
        _check_mixing(self.mixing)
        if self.granularity not in get_args(Granularity):
            raise RoutingError(
                f"unknown granularity {self.granularity!r}",
                hint=f"use one of {get_args(Granularity)}",
            )
        if self.ignore_token_ids and self.granularity != "sequence":
            raise RoutingError(
                "ignore_token_ids is for sequence-level routing (per token, every token routes)",
                hint="use Arrow(granularity='sequence', ignore_token_ids=...)",
            )
        object.__setattr__(self, "ignore_token_ids", tuple(int(i) for i in self.ignore_token_ids))
        if self.prompt_layers is not None:
            self._check_prompt_layers()

    def _check_prompt_layers(self) -> None:
        given = self.prompt_layers
        layers = tuple(given) if isinstance(given, (tuple, list)) else (given,)
        if self.granularity != "sequence":
            raise RoutingError(
                "prompt_layers is for sequence-level routing (per token, every module routes)",
                hint="use Arrow(granularity='sequence', prompt_layers=...)",
            )
        numbers = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in layers)
        if not (layers and numbers):
            raise RoutingError(
                f"prompt_layers must be layer numbers (integers >= 0), got {given!r}",
                hint="e.g. prompt_layers=(0,) scores the prompt at the first block only",
            )
        object.__setattr__(self, "prompt_layers", layers)

    def scores_prompt(self, module: str) -> bool:
        """Whether ``module``'s prompt scores count towards a sequence's choice."""
        return self.prompt_layers is None or layer_of(module) in self.prompt_layers

    def choose(self, scores: torch.Tensor) -> SequenceChoice:
        """Sequence granularity: each row's top-k of its summed prompt scores ``[rows, E]``."""
        top, index = scores.topk(self.top_k, dim=-1)
        return SequenceChoice(index, (top / self.temperature).softmax(dim=-1), scores)

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, Mixer]:
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
        mix_parameters = self.mixing == "parameters"
        adapted = {layer_of(module) for module in experts.modules}
        missing = sorted(set(self.prompt_layers or ()) - adapted)
        if missing:  # a layer scoring nothing would quietly route by the others alone
            raise RoutingError(
                f"no routed module lies in prompt_layers {missing}",
                hint=f"choose among the blocks the experts adapt: {sorted(adapted)}",
            )
        mixers: dict[str, Mixer] = {}
        for module, stack in experts.modules.items():
            vectors = prototypes.vectors[module].to(stack.A)
            if self.granularity == "sequence":
                mixers[module] = SequenceArrowMixer(
                    stack,
                    vectors,
                    mix_parameters=mix_parameters,
                    scores_prompt=self.scores_prompt(module),
                )
            else:
                mixers[module] = ArrowMixer(
                    stack,
                    vectors,
                    top_k=self.top_k,
                    temperature=self.temperature,
                    mix_parameters=mix_parameters,
                )
        return mixers


@dataclass(frozen=True)
class Merge:
    """One fixed combination of the experts, applied to every token."""

    weights: Mapping[str, float] | None = None  # None: the uniform average (mu)
    mixing: Mixing = "parameters"

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

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, Mixer]:
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

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, Mixer]:
        return {m: OracleMixer(stack) for m, stack in experts.modules.items()}


@dataclass(frozen=True)
class Base:
    """No expert: every routed layer adds nothing (the base model, e.g. to compare against)."""

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, Mixer]:
        return {}


STRATEGIES: dict[StrategyName, Callable[..., Strategy]] = {
    "arrow": Arrow,
    "uniform": Merge,
    "merge": Merge,
    "single": single,
    "oracle": Oracle,
    "base": Base,
    "elrea": ELREA,
}


def resolve(strategy: StrategyName | Strategy, options: dict[str, object]) -> Strategy:
    """A strategy object from a name and its options, or the object given (without options)."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise RoutingError(f"unknown strategy {strategy!r}", hint=f"use one of {[*STRATEGIES]}")
        try:
            return STRATEGIES[strategy](**options)
        except TypeError as error:
            raise RoutingError(f"bad options for strategy {strategy!r}: {error}") from error
    if not isinstance(strategy, Strategy):
        raise RoutingError(
            f"strategy must be a name or a strategy object, got {type(strategy).__name__}",
            hint=f"use one of {[*STRATEGIES]} or an object with build(), such as Arrow()",
        )
    if options:
        raise RoutingError(
            f"options {sorted(options)} given with a strategy object",
            hint="set them on the strategy object instead",
        )
    return strategy
