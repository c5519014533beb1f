"""ELREA: each prompt gets a logit ensemble of LoRA experts, weighted by its gradient
(arXiv 2502.00089, "Ensembles of Low-Rank Expert Adapters").

A library built by ``quiver.training.build_elrea_library`` holds a base adapter (trained on all
the data), one expert per gradient cluster (trained further from the base adapter), and the
``elrea`` artifact (``ElreaArtifact``): a centroid per member (a cluster's mean gradient feature;
the base adapter's is the mean of all of them), the statistics that standardise similarities to
it, and the projection (seed and dimension) that made the features. For each prompt:

1. its gradient feature with the base adapter (``gradients.py``, the build's exact recipe);
2. the cosine similarity to each member's centroid, standardised by the mean and standard
   deviation of the training examples' similarities to that centroid;
3. ``softmax(z / temperature)`` gives the weights; ``top_k`` keeps the largest, renormalised;
4. the next-token logits are ``sum_j w_j logits_j`` over the kept members.

The weights are fixed per prompt for the whole generation, and each batch row has its own. The
ensemble is one batched forward: the batch is expanded to ``rows x K`` (row ``i``'s ``j``-th
member at ``i * K + j``), every expanded row runs its member's LoRA through the stacked experts
(the fused low-rank kernels), and each row's K logits are combined. Forward hooks on the model do
the expanding and combining, so ``routed(...)``, ``routed.generate(...)`` (greedy or sampled, KV
cache included) and the inner model's ``generate`` all see ``rows`` rows. The KV cache holds the
expanded rows, and the prompt's choice travels with it: a cache is continued with the experts
and weights of the prompt that started it. Beam search, which reorders the cache by beam, is not
supported.

Inside ``routed.trace()``, a generation's trace holds its choice among ``trace.choices`` (as
sequence-level Arrow's) and, at every routed module and position of the caller's rows, that row's
ensemble weights, so ``layer_weights()`` and ``to_dict()`` read as for any strategy; the gradient
pass and the expanded rows stay out of it. The hooks act only in calls that route with this
ensemble: a model routed by another strategy runs ELREA inside ``routed.using("elrea", ...)``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import weakref
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from quiver.errors import RoutingError
from quiver.routing import context
from quiver.routing.context import CallState, SequenceChoice, check_selection
from quiver.routing.elrea_artifact import ElreaArtifact, stored_artifact
from quiver.routing.experts import ExpertSet
from quiver.routing.gradients import CountSketch, GradientPass, check_prompts, prompt_loss
from quiver.routing.layers import Choice, LowRankMixer
from quiver.routing.trace import RoutingTrace


@dataclass(frozen=True)
class EnsembleChoice(SequenceChoice):
    """Each prompt's ensemble: members ``index [rows, K]`` with ``weights [rows, K]`` (summing
    to 1 per row), chosen from ``scores [rows, E]`` (standardised similarities, or the fixed
    weights). A trace records it among its ``choices``, as sequence-level Arrow's."""

    def as_dicts(self, names: tuple[str, ...]) -> list[dict[str, float]]:
        """Per row, ``{expert: weight}`` of its members, heaviest first: ready for JSON or a bar
        chart."""
        return [
            {names[e]: float(w) for e, w in zip(row, weights, strict=True)}
            for row, weights in zip(self.index.tolist(), self.weights.tolist(), strict=True)
        ]


@dataclass
class _Call:
    """One forward's ELREA state: the member of each expanded row (and what the forward hook
    needs to finish the call), or a gradient pass."""

    rows: torch.Tensor | None = None
    choice: EnsembleChoice | None = None
    gradients: GradientPass | None = None
    labels: torch.Tensor | None = None
    positions: int = 0  # of the call's input (its logits may keep only the last)
    trace: RoutingTrace | None = None  # the caller's, recorded per original row
    untraced: AbstractContextManager | None = None  # keeps the expanded rows out of it
    token: Token | None = None
    _spread: dict = field(default_factory=dict)

    def per_token(self, x: torch.Tensor) -> Choice:
        """Each token's member (weight 1) for a layer input ``x [N, in]``: made once per call,
        as every module asks the same."""
        key = (len(x), x.device, x.dtype)
        if key not in self._spread:
            if len(x) % len(self.rows):
                raise RoutingError(f"{len(x)} tokens cannot be split among {len(self.rows)} rows")
            index = self.rows.to(x.device).repeat_interleave(len(x) // len(self.rows))[:, None]
            self._spread[key] = (index, x.new_ones(index.shape))
        return self._spread[key]


_NO_CALL = _Call()
_CALLS: ContextVar[Mapping[int, _Call]] = ContextVar(
    "quiver_elrea_calls", default=MappingProxyType({})
)
_KEYS = itertools.count()


def _cache_of(values: Any) -> Any:
    """The KV cache among a forward's inputs or outputs (``cache``; ``past_key_values`` before
    transformers 5). Looked up among the keys: transformers 5 warns on any other look-up of the
    old name."""
    keys = values.keys() if hasattr(values, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys and values[name] is not None:
            return values[name]
    return None


def _cache_length(cache: Any) -> int:
    get_seq_length = getattr(cache, "get_seq_length", None)
    return int(get_seq_length()) if callable(get_seq_length) else 1


def _cache_rows(cache: Any) -> int | None:
    """The batch rows a KV cache holds (None if this cache type does not say)."""
    layers = getattr(cache, "layers", None)  # transformers 5
    keys = getattr(layers[0], "keys", None) if layers else None
    if keys is None:
        key_cache = getattr(cache, "key_cache", None)  # transformers 4
        keys = key_cache[0] if key_cache else None
    return keys.shape[0] if isinstance(keys, torch.Tensor) and keys.dim() > 1 else None


class Ensemble:
    """What the mixers and forward hooks of one routed model share: the members, the base
    adapter, the projection, and how prompts choose (``artifact``, or ``fixed`` weights)."""

    def __init__(
        self,
        model: nn.Module,
        names: tuple[str, ...],
        base: str,
        projection: CountSketch,
        *,
        artifact: ElreaArtifact | None = None,
        fixed: torch.Tensor | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.model = model  # the causal LM whose modules the mixers route
        self.names, self.base_index = names, names.index(base)
        self.projection, self.artifact, self.fixed = projection, artifact, fixed
        self.top_k, self.temperature = top_k, temperature
        self.key = next(_KEYS)
        self._positions = "position_ids" in inspect.signature(model.forward).parameters
        self._choices: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> choice
        self._handles: list = []
        self.mixers: dict[str, EnsembleMixer] = {}

    @property
    def routes(self) -> bool:
        """True for ELREA (prompts choose members), False for a model that only gives features."""
        return self.artifact is not None or self.fixed is not None

    # -- per-call state ---------------------------------------------------------------------
    def current(self) -> _Call:
        return _CALLS.get().get(self.key, _NO_CALL)

    def _set(self, call: _Call) -> _Call:
        call.token = _CALLS.set(MappingProxyType({**_CALLS.get(), self.key: call}))
        return call

    @contextmanager
    def bound(self, call: _Call) -> Iterator[_Call]:
        self._set(call)
        try:
            yield call
        finally:
            _CALLS.reset(call.token)

    # -- features and choices ----------------------------------------------------------------
    def features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Each row's gradient feature ``[rows, dim]`` (unit rows): the gradient of its prompt's
        loss with respect to the base adapter, count-sketched."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        check_prompts(mask)
        end = int(mask.any(0).nonzero().max()) + 1  # a causal model: later columns cannot matter
        input_ids, mask = input_ids[:, :end], mask[:, :end]
        inputs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
        if self._positions:  # so that features do not depend on the padding side
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        gradient_pass = GradientPass(len(input_ids))
        with torch.enable_grad(), self.bound(_Call(gradients=gradient_pass)), self._untraced():
            logits = self.model(**inputs).logits
            gradients = gradient_pass.gradients(prompt_loss(logits, input_ids, mask))
        return self.projection(gradients)

    def choose(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> EnsembleChoice:
        """Each prompt's members and weights (see the module)."""
        if self.fixed is not None:
            scores = self.fixed.to(input_ids.device).expand(len(input_ids), -1)
            weights = scores
        else:
            features = self.features(input_ids, attention_mask)
            scores = self.artifact.standardised_similarity(features)
            weights = (scores / self.temperature).softmax(dim=-1)
        if self.top_k is None:
            index = torch.arange(len(self.names), device=weights.device).expand_as(weights)
            return EnsembleChoice(index, weights, scores)
        top, index = weights.topk(self.top_k, dim=-1)
        return EnsembleChoice(index, top / top.sum(-1, keepdim=True).clamp_min(1e-12), scores)

    # -- the forward hooks -------------------------------------------------------------------
    def attach(self) -> None:
        """Hook the model's forward: expand the batch to each row's members, combine logits."""
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]

    def _routed_layer(self) -> nn.Module | None:
        """The routed layer of this ensemble's first module; None once ``unroute()`` took the
        routed layers out of the model."""
        try:
            layer = self.model.get_submodule(next(iter(self.mixers)))
        except AttributeError:
            return None
        return layer if hasattr(layer, "owner") else None

    def _untraced(self) -> AbstractContextManager:
        """Keep a forward out of the caller's trace (a gradient pass, the expanded rows)."""
        layer = self._routed_layer()
        return nullcontext() if layer is None else context.bound(layer.owner, trace=None)

    def _active(self) -> CallState | None:
        """The routing state of this call when it routes with this ensemble (its routed model's
        strategy, or ``using()`` it); else None, and the hooks go once the model is unrouted."""
        layer = self._routed_layer()
        if layer is None:
            for handle in self._handles:
                handle.remove()
            return None
        call = context.current(layer.owner)
        active = layer.mixer if call.mixers is None else call.mixers.get(layer.name)
        return call if active is self.mixers[layer.name] else None

    def _before(self, model: nn.Module, args: tuple, kwargs: dict):
        if self.current().gradients is not None:
            return None  # our own gradient pass
        routing = self._active()
        if routing is None:
            return None  # another strategy routes this call, or the model is unrouted
        if len(args) > 1:
            raise RoutingError("an ELREA-routed model takes its inputs as keywords after input_ids")
        kwargs = {"input_ids": args[0], **kwargs} if args else dict(kwargs)
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise RoutingError(
                "ELREA routes by the prompt's token ids", hint="pass input_ids, not inputs_embeds"
            )
        choice, new = self._choice_for(kwargs, routing.prompt_mask)
        if new and routing.trace is not None:
            routing.trace.record_choice(choice)
        rows, members = choice.index.shape
        cache_rows = _cache_rows(_cache_of(kwargs))
        if len(input_ids) != rows or cache_rows not in (None, rows * members):
            raise RoutingError(
                f"this KV cache holds the ensembles of {rows} rows, but the call has "
                f"{len(input_ids)} rows and the cache {cache_rows} ensemble rows",
                hint="ELREA supports greedy and sampled generation, not beam search",
            )
        labels = kwargs.pop("labels", None)
        expanded = {
            key: value.repeat_interleave(members, dim=0)
            if isinstance(value, torch.Tensor) and value.dim() and len(value) == rows
            else value
            for key, value in kwargs.items()
        }
        untraced = self._untraced()
        untraced.__enter__()
        self._set(
            _Call(
                rows=choice.index.flatten(),
                choice=choice,
                labels=labels,
                positions=input_ids.shape[-1],
                trace=routing.trace,
                untraced=untraced,
            )
        )
        return (), expanded

    def _choice_for(
        self, kwargs: dict, prompt_mask: torch.Tensor | None
    ) -> tuple[EnsembleChoice, bool]:
        """The choice of the generation this call continues (by its cache), or a new one (from
        the ``prompt_mask`` positions when given: teacher-forced prompt + answer rows); and
        whether it is new."""
        cache = _cache_of(kwargs)
        if cache is not None:
            choice = self._choices.get(cache)
            if choice is not None:
                return choice, False
            if _cache_length(cache) > 0:
                raise RoutingError(
                    "this KV cache was not started by the ELREA-routed model",
                    hint="start the generation on the routed model",
                )
        mask = kwargs.get("attention_mask") if prompt_mask is None else prompt_mask
        choice = self.choose(kwargs["input_ids"], mask)
        if cache is not None:
            self._choices[cache] = choice
        return choice, True

    def _after(self, model: nn.Module, args: tuple, kwargs: dict, output: Any):
        call = self.current()
        if call.rows is None:
            return None
        _CALLS.reset(call.token)
        call.untraced.__exit__(None, None, None)
        if output is None:  # the forward raised; its error propagates
            return None
        logits = getattr(output, "logits", None)
        if logits is None:
            raise RoutingError("ELREA needs the model's logits", hint="leave return_dict on")
        choice = call.choice
        cache = _cache_of(output)
        if cache is not None:
            self._choices.setdefault(cache, choice)
        rows, members = choice.index.shape
        per_member = logits.view(rows, members, *logits.shape[1:]).float()
        weights = choice.weights.to(per_member).view(rows, members, *[1] * (logits.dim() - 1))
        output.logits = (weights * per_member).sum(1).to(logits.dtype)
        if call.labels is not None:
            output.loss = model.loss_function(
                logits=output.logits, labels=call.labels, vocab_size=output.logits.shape[-1]
            )
        if call.trace is not None:
            self._record(call.trace, choice, torch.Size([rows, call.positions]))
        return output

    def _record(self, trace: RoutingTrace, choice: EnsembleChoice, shape: torch.Size) -> None:
        """Every module gave each original row's tokens its prompt's ensemble weights."""
        index = choice.index.repeat_interleave(shape[1], dim=0)
        weights = choice.weights.repeat_interleave(shape[1], dim=0)
        for name in self.mixers:
            trace.record(name, shape, index, weights)


class EnsembleMixer(LowRankMixer):
    """A routed module of an ELREA model: every (expanded) batch row runs one member's LoRA, the
    one its ensemble chose; in a gradient pass, every row runs a private copy of the base
    adapter (``GradientPass``)."""

    def __init__(self, stack, ensemble: Ensemble, module: str) -> None:
        super().__init__(stack)
        self.ensemble, self.module = ensemble, module
        base = ensemble.base_index
        self.base_rows = slice(base * self.rank, base * self.rank + stack.ranks[base])
        self.base_scale = float(stack.scales[base])

    def select(self, x: torch.Tensor, batch_shape: torch.Size, call: CallState) -> Choice:
        state = self.ensemble.current()
        if state.rows is not None:
            return state.per_token(x)
        if self.ensemble.routes:
            raise RoutingError(
                "ELREA's experts run inside the routed model's forward",
                hint="call the routed model (routed(...), routed.generate(...)), not its inner "
                "modules",
            )
        return self._base(x)

    def route_(
        self, out: torch.Tensor, x: torch.Tensor, batch_shape: torch.Size, call: CallState
    ) -> Choice:
        gradients = self.ensemble.current().gradients
        if gradients is None:
            return super().route_(out, x, batch_shape, call)
        lora_a, b_rows = self.a_rows[self.base_rows], self.b_rows[self.base_rows]
        out.add_(gradients.lora_delta(self.module, x, lora_a, b_rows, self.base_scale))
        return self._base(x)

    def _base(self, x: torch.Tensor) -> Choice:
        """Every token to the base adapter."""
        index = torch.full((len(x), 1), self.ensemble.base_index, device=x.device)
        return index, x.new_ones(index.shape)


def _mixers(ensemble: Ensemble, experts: ExpertSet) -> dict[str, EnsembleMixer]:
    ensemble.mixers = {m: EnsembleMixer(stack, ensemble, m) for m, stack in experts.modules.items()}
    return ensemble.mixers


@dataclass(frozen=True)
class ELREA:
    """ELREA routing: each prompt's logit ensemble of the base adapter and the experts, weighted
    by its gradient's standardised similarity to their centroids (softmax at ``temperature``);
    ``top_k`` keeps the heaviest members (None: all). ``weights`` (``expert -> weight``) fixes
    every prompt's weights instead (no gradient pass)."""

    top_k: int | None = None
    temperature: float = 1.0
    weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        check_selection(self.top_k, self.temperature, all_allowed=True)

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, nn.Module]:
        artifact = stored_artifact(source)
        artifact.check_matches(experts)
        if self.top_k is not None and self.top_k > len(experts.names):
            raise RoutingError(
                f"top_k={self.top_k} but the library has {len(experts.names)} members "
                "(the base adapter and the experts)",
                hint="choose top_k at most the number of members, or None for all",
            )
        ensemble = Ensemble(
            model,
            experts.names,
            artifact.base_expert,
            artifact.projection,
            artifact=artifact.reordered(experts.names),
            fixed=self._fixed(experts),
            top_k=self.top_k,
            temperature=self.temperature,
        )
        mixers = _mixers(ensemble, experts)
        ensemble.attach()
        return mixers

    def _fixed(self, experts: ExpertSet) -> torch.Tensor | None:
        if self.weights is None:
            return None
        fixed = torch.zeros(len(experts.names))
        for name, weight in self.weights.items():
            if not (isinstance(weight, (int, float)) and 0 <= weight < math.inf):
                raise RoutingError(
                    f"ensemble weight of {name!r} is {weight!r}, not a finite number >= 0"
                )
            fixed[experts.index(name)] = float(weight)
        if not fixed.sum() > 0:
            raise RoutingError("the fixed ensemble weights are all zero")
        return fixed


@dataclass(frozen=True)
class PromptGradients:
    """Not a router: every row runs ``base_expert``, and ``prompt_features(model, ...)`` gives
    each prompt's ELREA gradient feature (how a library's build makes its training features)."""

    projection: CountSketch
    base_expert: str

    def build(self, experts: ExpertSet, model: nn.Module, source: object) -> dict[str, nn.Module]:
        ensemble = Ensemble(model, experts.names, self.base_expert, self.projection)
        return _mixers(ensemble, experts)


def _ensemble_of(model: nn.Module) -> Ensemble:
    for module in model.modules():
        mixer = getattr(module, "mixer", None)
        if isinstance(mixer, EnsembleMixer):
            return mixer.ensemble
    raise RoutingError(
        "this model is not routed with ELREA",
        hint="route(model, library, 'elrea') or route(model, experts, PromptGradients(...))",
    )


def prompt_features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Each prompt's gradient feature ``[rows, dim]`` on a model routed with ``ELREA`` or
    ``PromptGradients``: the projected, normalised gradient of its loss with respect to the base
    adapter. Rows may be padded on either side (``attention_mask``)."""
    return _ensemble_of(model).features(input_ids, attention_mask)


def ensemble_choice(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> EnsembleChoice:
    """The members and weights ELREA gives each prompt (what ``generate`` will use)."""
    ensemble = _ensemble_of(model)
    if not ensemble.routes:
        raise RoutingError("a PromptGradients model gives features, not ensembles")
    return ensemble.choose(input_ids, attention_mask)
