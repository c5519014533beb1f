"""Per-call routing state: what one call of a routed model needs beyond its weights.

One routed model serves many callers at once (the app shares one model across chats), so what
belongs to one call never lives on the shared layers: the strategy it chose, the trace being
recorded, the experts the oracle was told to use, the experts each sequence chose, the prompt
scores being summed. It
lives in a ``contextvars.ContextVar``, keyed by routed model, so every thread and asyncio task
sees only its own; a thread started inside a ``with`` block shares it by running in
``contextvars.copy_context()``. Inside ``torch.compile`` (which cannot trace a ContextVar) a
routed model sees no per-call state: it routes by its strategy alone, per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from quiver.errors import RoutingError

if TYPE_CHECKING:
    from quiver.routing.layers import Mixer
    from quiver.routing.strategies import Strategy
    from quiver.routing.trace import RoutingTrace


def batch_rows(batch_shape: torch.Size) -> int:
    """Batch rows of a routed layer's input shape (without features): ``[rows, tokens]``; an
    unbatched ``[tokens]`` counts as one row."""
    return batch_shape[0] if len(batch_shape) > 1 else 1


def check_selection(top_k: int | None, temperature: float, *, all_allowed: bool) -> None:
    """How a strategy picks experts: ``top_k`` a positive integer (None for all, where
    ``all_allowed``), ``temperature`` a positive finite number."""
    if top_k is None and all_allowed:
        pass
    elif isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        which = "an integer, or None for all" if all_allowed else "an integer"
        raise RoutingError(f"top_k must be at least 1 ({which}), got {top_k!r}")
    real = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (real and 0 < temperature < math.inf):
        raise RoutingError(f"temperature must be positive and finite, got {temperature!r}")


@dataclass(frozen=True)
class SequenceChoice:
    """The experts each batch row uses for a whole sequence: ``index, weights [rows, k]``,
    chosen from ``scores [rows, E]`` (per-module normalised prompt scores, summed)."""

    index: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    _spread: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def per_token(self, batch_shape: torch.Size, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The choice for every token of a layer input ``batch_shape``, as ``[N, k]`` on
        ``like``'s device (weights in its dtype); made once per shape, as every module and
        decoding step of a call asks for the same. A batch that is a multiple of the rows
        (``generate`` with beams or several returned sequences repeats each row) repeats each
        row's choice."""
        key = (tuple(batch_shape), like.device, like.dtype)
        if key not in self._spread:
            self._spread[key] = self._per_token(batch_shape, like)
        return self._spread[key]

    def _per_token(self, batch_shape: torch.Size, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, chosen = batch_rows(batch_shape), len(self.index)
        if rows % chosen:
            raise RoutingError(
                f"the sequence routing chose experts for {chosen} rows, the batch has {rows}",
                hint="score the same batch you run (routed(...) and routed.generate(...) do)",
            )
        tokens = math.prod(batch_shape) // rows
        k = self.index.shape[1]

        def spread(choice: torch.Tensor) -> torch.Tensor:
            repeated = choice.repeat_interleave(rows // chosen, dim=0)
            return repeated[:, None].expand(rows, tokens, k).reshape(-1, k).contiguous()

        return spread(self.index).to(like.device), spread(self.weights).to(like)


class PromptScores:
    """Sums over routed modules each row's mean ``|x . p_e|`` over its prompt tokens, normalised
    per module to sum to 1 over the experts (so every module has one equal vote)."""

    def __init__(self, prompt_mask: torch.Tensor) -> None:
        counts = prompt_mask.sum(-1, keepdim=True)
        if (counts == 0).any():
            raise RoutingError(
                "a row has no prompt token to route by",
                hint="give every row at least one unmasked prompt token that "
                "Arrow.ignore_token_ids does not leave out",
            )
        self.token_weights = prompt_mask.float() / counts
        self.total: torch.Tensor | None = None

    def add(self, scores: torch.Tensor) -> None:
        """Add one module's scores ``[N, E]`` for the ``N = rows * tokens`` prompt positions."""
        weights = self.token_weights.to(scores.device)
        per_token = scores.float().view(*weights.shape, -1)
        mean = torch.einsum("bt,bte->be", weights, per_token)
        normalised = mean / mean.sum(-1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny)
        self.total = normalised if self.total is None else self.total + normalised


@dataclass(frozen=True)
class CallState:
    """One routed model's state for the current call."""

    trace: RoutingTrace | None = None
    strategy: Strategy | None = None  # routed.using(): this call's strategy, and
    mixers: Mapping[str, Mixer] | None = None  # its mixers by module (absent: adds nothing)
    oracle_rows: torch.Tensor | None = None  # expert per batch row (or one for all rows)
    choice: SequenceChoice | None = None  # sequence-level Arrow: the rows' experts
    scoring: PromptScores | None = None  # set while a no-expert pass scores a prompt
    prompt_mask: torch.Tensor | None = None  # ELREA, teacher-forced: which positions are prompt


NO_STATE = CallState()
_STATES: ContextVar[Mapping[int, CallState]] = ContextVar(
    "quiver_routing_calls", default=MappingProxyType({})
)


def current(owner: int) -> CallState:
    """The state of routed model ``owner`` in this context (none inside torch.compile)."""
    if torch.compiler.is_compiling():
        return NO_STATE
    return _STATES.get().get(owner, NO_STATE)


@contextmanager
def bound(owner: int, **changes: object) -> Iterator[CallState]:
    """Within the block, routed model ``owner`` sees its current state with ``changes``."""
    states = _STATES.get()
    state = replace(states.get(owner, NO_STATE), **changes)
    token = _STATES.set(MappingProxyType({**states, owner: state}))
    try:
        yield state
    finally:
        _STATES.reset(token)
