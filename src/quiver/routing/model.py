"""``route()``: wrap a base model's LoRA-targeted layers so a library of experts drives them.

What one call needs beyond the weights (its trace, the oracle's experts, the experts sequence-level
Arrow chose for its rows) belongs to the calling context (``context.py``), not to the layers: one
routed model serves concurrent callers, each with its own routing and its own trace.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from quiver.errors import RoutingError
from quiver.routing import context
from quiver.routing.context import PromptScores, SequenceChoice
from quiver.routing.elrea import ELREA
from quiver.routing.experts import ExpertSource, expert_index, load_experts
from quiver.routing.layers import Mixer, OracleMixer, RoutedLinear
from quiver.routing.strategies import Arrow, Strategy, StrategyName, resolve
from quiver.routing.trace import RoutingTrace

_OWNERS = itertools.count()  # tells routed models apart in the per-call state


class RoutedModel(nn.Module):
    """A causal LM whose targeted layers route over experts; ``forward``/``generate`` as usual.

    With ``Arrow(granularity="sequence")`` each call first scores its rows' prompts on a
    no-expert pass (``choose_experts``): ``generate`` routes by the prompt it is given;
    ``forward`` by its whole input, or by each row's first ``prompt_lengths[row]`` unmasked
    tokens (teacher-forced scoring of prompt + answer rows); so does ELREA. Pass
    ``attention_mask`` as a keyword so padding is left out of the scores.
    """

    def __init__(
        self,
        model: nn.Module,
        expert_names: tuple[str, ...],
        strategy: Strategy,
        owner: int,
        source: ExpertSource,
    ) -> None:
        super().__init__()
        self.model = model
        self.expert_names = expert_names
        self.strategy = strategy
        self.owner = owner
        self._source = source
        self._built: dict[str, dict[str, Mixer]] = {}  # using(): mixers per other strategy
        self._building = threading.Lock()

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

    def forward(
        self, *args: Any, prompt_lengths: Sequence[int] | torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        with self._sequence_routing(args, kwargs, prompt_lengths):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        prompt = {**kwargs, "input_ids": kwargs.get("inputs", kwargs.get("input_ids"))}
        with self._sequence_routing(args, prompt, None):
            return self.model.generate(*args, **kwargs)

    def choose_experts(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        prompt_lengths: Sequence[int] | torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> SequenceChoice:
        """Sequence-level Arrow's experts for each row, from its prompt (the unmasked tokens, or
        the first ``prompt_lengths[row]`` of them, less those in ``Arrow.ignore_token_ids``), on
        one no-expert pass of the base model's backbone: every routed module adds its normalised
        prompt scores (``PromptScores``)."""
        arrow = self._sequence_arrow()
        if arrow is None:
            raise RoutingError(
                "choose_experts() is for sequence-level routing",
                hint="route(model, experts, Arrow(granularity='sequence'))",
            )
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise RoutingError("no prompt to route by", hint="pass input_ids or inputs_embeds")
        mask = attention_mask
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        prompt = _prompt_mask(mask, prompt_lengths)
        if arrow.ignore_token_ids:
            if input_ids is None:
                raise RoutingError(
                    "Arrow.ignore_token_ids needs the prompt's input_ids, not inputs_embeds",
                    hint="pass input_ids, or route without ignore_token_ids",
                )
            ignored = torch.tensor(arrow.ignore_token_ids, device=input_ids.device)
            prompt = prompt & ~torch.isin(input_ids, ignored)
        end = int(prompt.any(0).nonzero().max()) + 1 if prompt.any() else 1
        scoring = PromptScores(prompt[:, :end])  # a causal model: later tokens cannot matter
        backbone = getattr(self.model, "base_model", self.model)
        inputs = {"input_ids" if input_ids is not None else "inputs_embeds": tokens[:, :end]}
        inputs.update(attention_mask=mask[:, :end], use_cache=False)
        if "position_ids" in inspect.signature(backbone.forward).parameters:
            inputs["position_ids"] = (mask[:, :end].long().cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad(), context.bound(self.owner, scoring=scoring):
            backbone(**inputs)
        return arrow.choose(scoring.total)

    @contextmanager
    def using(self, strategy: StrategyName | Strategy, **options: Any) -> Iterator[RoutedModel]:
        """Route the calls of this context by another strategy over the same experts (a name
        and options as for ``route``, or a strategy object; ``"base"`` adds no expert). One
        model in memory then serves callers that each choose theirs. A strategy's mixers are
        built on its first use (the experts are read again, onto the model's current device and
        dtype) and kept for the next."""
        strategy = resolve(strategy, options)
        own = repr(strategy) == repr(self.strategy)  # the layers' own mixers
        with context.bound(
            self.owner, strategy=strategy, mixers=None if own else self._mixers(strategy)
        ):
            yield self

    def _mixers(self, strategy: Strategy) -> dict[str, Mixer]:
        key = repr(strategy)  # strategies are frozen dataclasses: equal configs, equal reprs
        with self._building:
            if key not in self._built:
                reference = next(self.model.parameters())
                experts = load_experts(self._source, dtype=reference.dtype, device=reference.device)
                self._built[key] = strategy.build(experts, self.model, self._source)
        return self._built[key]

    def _active_strategy(self) -> Strategy:
        return context.current(self.owner).strategy or self.strategy

    @contextmanager
    def trace(self) -> Iterator[RoutingTrace]:
        """Record, for this calling context only, every routed module's per-token expert weights
        (and sequence-level choices) while the block runs."""
        trace = RoutingTrace(self.expert_names)
        with context.bound(self.owner, trace=trace):
            yield trace

    @contextmanager
    def use_expert(self, names: str | Sequence[str]) -> Iterator[RoutedModel]:
        """Oracle routing: send all rows (one name) or each batch row (one name per row) to it,
        for calls from this context only."""
        call = context.current(self.owner)
        mixers = call.mixers or {n: layer.mixer for n, layer in self.routed_layers.items()}
        if not any(isinstance(mixer, OracleMixer) for mixer in mixers.values()):
            raise RoutingError(
                "use_expert() needs a model routed with strategy='oracle'",
                hint="route(model, experts, strategy='oracle')",
            )
        names = [names] if isinstance(names, str) else list(names)
        rows = torch.tensor([expert_index(self.expert_names, name) for name in names])
        with context.bound(self.owner, oracle_rows=rows):
            yield self

    def unroute(self) -> nn.Module:
        """Put the original layers back and return the plain base model."""
        for name, layer in self.routed_layers.items():
            _replace(self.model, name, layer.base_layer)
        return self.model

    def _sequence_arrow(self) -> Arrow | None:
        strategy = self._active_strategy()
        sequence = isinstance(strategy, Arrow) and strategy.granularity == "sequence"
        return strategy if sequence else None

    @contextmanager
    def _sequence_routing(
        self, args: tuple, kwargs: dict, prompt_lengths: Sequence[int] | torch.Tensor | None
    ) -> Iterator[None]:
        """For sequence-level Arrow: choose each row's experts from its prompt (the first
        positional argument or ``input_ids``/``inputs_embeds``), for this call only. ELREA
        chooses in its own forward hook, from the prompt positions bound here."""
        if self._sequence_arrow() is None:
            if prompt_lengths is None:
                yield
                return
            if not isinstance(self._active_strategy(), ELREA):
                raise RoutingError(
                    "prompt_lengths is for sequence-level routing (Arrow per sequence, ELREA)",
                    hint="route with Arrow(granularity='sequence') or ELREA, or leave "
                    "prompt_lengths out",
                )
            tokens = args[0] if args else kwargs.get("input_ids")
            mask = kwargs.get("attention_mask")
            if mask is None and tokens is not None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
            with context.bound(self.owner, prompt_mask=_prompt_mask(mask, prompt_lengths)):
                yield
            return
        choice = self.choose_experts(
            args[0] if args else kwargs.get("input_ids"),
            kwargs.get("attention_mask"),
            prompt_lengths=prompt_lengths,
            inputs_embeds=kwargs.get("inputs_embeds"),
        )
        with context.bound(self.owner, choice=choice) as call:
            if call.trace is not None:
                call.trace.record_choice(choice)
            yield


def _prompt_mask(mask: torch.Tensor, prompt_lengths: Sequence[int] | torch.Tensor | None):
    """Which positions are prompt: unmasked, and among each row's first ``prompt_lengths``."""
    if prompt_lengths is None:
        return mask.bool()
    lengths = torch.as_tensor(prompt_lengths, device=mask.device).reshape(-1, 1)
    if len(lengths) != len(mask):
        raise RoutingError(
            f"{len(lengths)} prompt lengths for a batch of {len(mask)} rows",
            hint="give one prompt length per row",
        )
    return mask.bool() & (mask.long().cumsum(-1) <= lengths)


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

    ``strategy`` is a name (``"arrow"``, ``"uniform"``, ``"merge"``, ``"single"``, ``"oracle"``,
    ``"base"``) with its options as keywords, e.g. ``route(model, lib, "arrow", top_k=4)``, or a
    strategy object such as ``Arrow(top_k=4, mixing="parameters")``; ``routed.using(...)``
    switches it per call. Every module the experts target is wrapped in place;
    ``RoutedModel.unroute()`` restores them.
    """
    strategy = resolve(strategy, options)
    if any(isinstance(m, RoutedLinear) for m in model.modules()):
        raise RoutingError("this model is already routed", hint="call .unroute() on it first")
    expert_set = load_experts(experts, model)
    owner = next(_OWNERS)
    mixers = strategy.build(expert_set, model, experts)
    for name in expert_set.modules:
        layer = RoutedLinear(model.get_submodule(name), name, mixers.get(name), owner)
        _replace(model, name, layer)
    return RoutedModel(model, expert_set.names, strategy, owner, experts)
