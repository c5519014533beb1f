"""A record of routing decisions: which experts each token used, and with what weight.

Recorded inside ``with routed.trace() as trace:`` for the calls made from that context only:
another thread's calls on the same model never mix in. All tensors are float32 on CPU, ``E`` =
number of experts, in ``expert_names`` order:

- ``trace.module_weights(name)``: ``[batch, tokens, E]`` for one routed module; a row sums to 1
  for Arrow (top-k softmax, zeros elsewhere) and oracle, and to the merge weights for merges.
- ``trace.layer_weights()``: ``{layer: [batch, tokens, E]}``, the mean over that layer's modules
  (layer = the first number in the module path, e.g. ``model.layers.3.mlp.up_proj`` -> 3).
- ``trace.step_weights()``: ``[batch, steps, E]``, one row per forward call at its last position,
  averaged over layers: in ``generate`` the prompt's pass, then one pass per new token, so step
  ``i`` is the routing that produced generated token ``i``. ``trace.step_layer_weights()``: the
  same per layer, ``{layer: [batch, steps, E]}``.
- ``trace.choices``: the per-sequence choice of each call (sequence-level Arrow's
  ``SequenceChoice``: per row the experts' indices and weights); ``trace.sequence_weights(row)``
  reads them as ``{expert: weight}``.
- ``trace.to_dict(row)``: all of it for one batch row as nested lists, ready for JSON or a
  heatmap.

``tokens`` counts every position the model saw while recording, in order: for ``generate`` the
prompt (including padding), then one position per decoding step (every generated token but the
last, which no forward pass reads). A trace can be read while a generation runs in another
thread (a streamed chat): every view covers the ``trace.steps`` forward calls that all modules
have finished.

Recording is cheap, as it runs at every routed module on every token: a module's choice is kept as
it came (``index, weights [N, k]``, on the model's device: no copy, no device sync). The dense
``[.., E]`` views are built when read, one scatter per module.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn import functional as F

from quiver.errors import RoutingError
from quiver.routing.context import SequenceChoice, batch_rows

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(module: str) -> int:
    """The block number of a module path, or -1 for modules outside numbered blocks."""
    match = _LAYER_NUMBER.search(module)
    return int(match.group(1)) if match else -1


class _Call(NamedTuple):
    """One module's choice in one forward call: ``index, weights [N, k]`` for the
    ``N = prod(batch_shape)`` tokens, as the mixer returned them."""

    batch_shape: torch.Size
    index: torch.Tensor
    weights: torch.Tensor


def _widened(choice: torch.Tensor, k: int) -> torch.Tensor:
    """A choice of fewer than ``k`` experts padded to ``k`` (expert 0, weight 0)."""
    return choice if choice.shape[-1] == k else F.pad(choice, (0, k - choice.shape[-1]))


def _positions(calls: Sequence[_Call], *, last: bool) -> torch.Tensor:
    """Where each batch row's positions are in the calls' choices concatenated: ``[rows, P]``,
    the positions of every call in order (``P`` = all of them, or the last of each call)."""
    rows = {batch_rows(call.batch_shape) for call in calls}
    if len(rows) > 1:
        raise RoutingError(
            f"the trace recorded calls of {sorted(rows)} batch rows",
            hint="trace calls of one batch size at a time (one `with routed.trace()` each)",
        )
    batch = rows.pop()
    tokens = torch.tensor([call.index.shape[0] // batch for call in calls])
    starts = (tokens * batch).cumsum(0) - tokens * batch  # each call's first row, flattened
    if last:
        call, offset = torch.arange(len(calls)), tokens - 1
    else:
        call = torch.repeat_interleave(torch.arange(len(calls)), tokens)
        offset = torch.arange(len(call)) - (tokens.cumsum(0) - tokens)[call]
    return starts[call] + torch.arange(batch)[:, None] * tokens[call] + offset


class RoutingTrace:
    """Filled by a routed model inside ``with routed.trace() as trace:``."""

    def __init__(self, expert_names: tuple[str, ...]) -> None:
        self.expert_names = expert_names
        self.choices: list[SequenceChoice] = []
        self._calls: dict[str, list[_Call]] = {}  # per module, one entry per forward call

    def record(
        self, module: str, shape: torch.Size, index: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """Keep ``module``'s choice ``index, weights [N, k]`` for tokens of ``shape`` as is."""
        self._calls.setdefault(module, []).append(_Call(shape, index.detach(), weights.detach()))

    def record_choice(self, choice: SequenceChoice) -> None:
        self.choices.append(choice)

    @property
    def modules(self) -> list[str]:
        return list(self._calls)

    @property
    def steps(self) -> int:
        """Forward calls that every routed module has recorded (all of them once a call ends)."""
        return min((len(calls) for calls in list(self._calls.values())), default=0)

    def module_weights(self, module: str) -> torch.Tensor:
        return self._dense({module: self._calls[module][: self.steps]}, last=False)[module]

    def layer_weights(self) -> dict[int, torch.Tensor]:
        return self._by_layer(last=False)

    def step_layer_weights(self) -> dict[int, torch.Tensor]:
        return self._by_layer(last=True)

    def step_weights(self) -> torch.Tensor:
        layers = list(self.step_layer_weights().values())
        if not layers:
            return torch.zeros(0, 0, len(self.expert_names))
        return torch.stack(layers).mean(0)

    def _by_layer(self, *, last: bool) -> dict[int, torch.Tensor]:
        steps = self.steps
        if not steps:
            return {}
        recorded = {module: calls[:steps] for module, calls in list(self._calls.items())}
        by_layer = defaultdict(list)
        for module, weights in self._dense(recorded, last=last).items():
            by_layer[layer_of(module)].append(weights)
        return {layer: torch.stack(ws).mean(0) for layer, ws in sorted(by_layer.items())}

    def _dense(self, recorded: dict[str, list[_Call]], *, last: bool) -> dict[str, torch.Tensor]:
        """Each module's ``[batch, positions, E]`` weights of its calls in order (only each
        call's last position with ``last``). Modules whose calls saw the same numbers of tokens
        (all of a model's, usually) are done together: their choices joined and gathered at once
        on their device, then scattered into dense rows on the CPU."""
        alike = defaultdict(list)
        for module, calls in recorded.items():
            alike[tuple(call.index.shape[0] for call in calls)].append(module)
        dense = {}
        for modules in alike.values():
            calls = [call for module in modules for call in recorded[module]]
            k = max({call.index.shape[-1] for call in calls})
            index = torch.cat([_widened(call.index, k) for call in calls])
            weights = torch.cat([_widened(call.weights, k) for call in calls])
            positions = _positions(recorded[modules[0]], last=last)  # [rows, P], in one module
            every = torch.arange(len(modules))[:, None, None] * (len(index) // len(modules))
            positions = (positions + every).to(index.device)  # [modules, rows, P]
            chosen = torch.zeros(*positions.shape, len(self.expert_names))
            # scatter_add: widened slots add weight 0
            chosen.scatter_add_(3, index[positions].cpu(), weights[positions].float().cpu())
            dense.update(zip(modules, chosen, strict=True))
        return {module: dense[module] for module in recorded}

    def sequence_weights(self, row: int = 0) -> list[dict[str, float]]:
        """For each call with a per-sequence choice, the experts batch row ``row`` used for its
        whole sequence, as ``{expert: weight}``."""
        recorded = next(iter(list(self._calls.values())), None)
        batch = batch_rows(recorded[0].batch_shape) if recorded else 1
        return [self._chosen(choice, row, batch) for choice in self.choices]

    def to_dict(self, row: int = 0) -> dict:
        """One batch row: ``layers`` (per layer, per position), ``steps`` (per forward call,
        mean over layers), ``step_layers`` (the same per layer) as ``[..][E]`` lists; and for
        sequence-level Arrow, ``sequence``: the experts each call chose for the row, with
        weights."""
        steps = self.step_weights()  # [batch, steps, E]
        return {
            "experts": list(self.expert_names),
            "layers": {str(layer): w[row].tolist() for layer, w in self.layer_weights().items()},
            "steps": steps[row].tolist() if len(steps) else [],
            "step_layers": {
                str(layer): w[row].tolist() for layer, w in self.step_layer_weights().items()
            },
            "sequence": self.sequence_weights(row),
        }

    def _chosen(self, choice: SequenceChoice, row: int, batch: int) -> dict[str, float]:
        """A row's sequence choice as ``{expert: weight}`` (generate may repeat each row)."""
        source = row * len(choice.index) // max(batch, len(choice.index))  # rows repeated alike
        pairs = zip(choice.index[source].tolist(), choice.weights[source].tolist(), strict=True)
        return {self.expert_names[e]: float(w) for e, w in pairs}
