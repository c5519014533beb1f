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
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.nn import functional as F

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

    def rows(self, last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``index, weights [batch, tokens, k]`` (only the last position with ``last``)."""
        rows = batch_rows(self.batch_shape)
        index = self.index.reshape(rows, -1, self.index.shape[-1])
        weights = self.weights.reshape(rows, -1, self.weights.shape[-1])
        return (index[:, -1:], weights[:, -1:]) if last else (index, weights)


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
        return self._dense(self._calls[module][: self.steps], last=False)

    def layer_weights(self) -> dict[int, torch.Tensor]:
        return self._by_layer(lambda calls: self._dense(calls, last=False))

    def step_layer_weights(self) -> dict[int, torch.Tensor]:
        return self._by_layer(lambda calls: self._dense(calls, last=True))

    def step_weights(self) -> torch.Tensor:
        layers = list(self.step_layer_weights().values())
        if not layers:
            return torch.zeros(0, 0, len(self.expert_names))
        return torch.stack(layers).mean(0)

    def _dense(self, calls: Sequence[_Call], *, last: bool) -> torch.Tensor:
        """``[batch, positions, E]`` weights of ``calls``, concatenated along the positions: all
        the choices are moved to the CPU at once and scattered into dense rows there."""
        chosen = [call.rows(last) for call in calls]
        k = max(index.shape[-1] for index, _ in chosen)
        index = torch.cat([F.pad(i, (0, k - i.shape[-1])) for i, _ in chosen], dim=1)
        weights = torch.cat([F.pad(w.float(), (0, k - w.shape[-1])) for _, w in chosen], dim=1)
        dense = torch.zeros(*index.shape[:2], len(self.expert_names))
        return dense.scatter_add_(2, index.cpu(), weights.cpu())  # padding adds weight 0

    def _by_layer(self, per_module: Callable[[list[_Call]], torch.Tensor]) -> dict:
        steps, by_layer = self.steps, defaultdict(list)
        if not steps:
            return {}
        for module, calls in list(self._calls.items()):
            by_layer[layer_of(module)].append(per_module(calls[:steps]))
        return {layer: torch.stack(ws).mean(0) for layer, ws in sorted(by_layer.items())}

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
