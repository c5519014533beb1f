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
- ``trace.choices``: sequence-level Arrow's choice of each call (``SequenceChoice``: per row the
  experts' indices and weights).
- ``trace.to_dict(row)``: all of it for one batch row as nested lists, ready for JSON or a
  heatmap.

``tokens`` counts every position the model saw while recording, in order: for ``generate`` the
prompt (including padding), then one position per decoding step (every generated token but the
last, which no forward pass reads). A trace can be read while a generation runs in another
thread (a streamed chat): every view covers the ``trace.steps`` forward calls that all modules
have finished.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch

from quiver.routing.context import SequenceChoice

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(module: str) -> int:
    """The block number of a module path, or -1 for modules outside numbered blocks."""
    match = _LAYER_NUMBER.search(module)
    return int(match.group(1)) if match else -1


class RoutingTrace:
    """Filled by a routed model inside ``with routed.trace() as trace:``."""

    def __init__(self, expert_names: tuple[str, ...]) -> None:
        self.expert_names = expert_names
        self.choices: list[SequenceChoice] = []
        self._calls: dict[str, list[torch.Tensor]] = {}  # per module: [batch, tokens, E] a call

    def record(
        self, module: str, shape: torch.Size, index: torch.Tensor, weights: torch.Tensor
    ) -> None:
        dense = torch.zeros(index.shape[0], len(self.expert_names))
        dense.scatter_(1, index.detach().cpu(), weights.detach().float().cpu())
        batch_shape = shape if len(shape) > 1 else (1, *shape)
        self._calls.setdefault(module, []).append(dense.view(*batch_shape, -1))

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
        return torch.cat(self._calls[module][: self.steps], dim=1)

    def layer_weights(self) -> dict[int, torch.Tensor]:
        return self._by_layer(lambda calls: torch.cat(calls, dim=1))

    def step_layer_weights(self) -> dict[int, torch.Tensor]:
        return self._by_layer(lambda calls: torch.stack([call[:, -1] for call in calls], dim=1))

    def step_weights(self) -> torch.Tensor:
        layers = list(self.step_layer_weights().values())
        if not layers:
            return torch.zeros(0, 0, len(self.expert_names))
        return torch.stack(layers).mean(0)

    def _by_layer(self, per_module: Callable[[list[torch.Tensor]], torch.Tensor]) -> dict:
        steps, by_layer = self.steps, defaultdict(list)
        if not steps:
            return {}
        for module, calls in list(self._calls.items()):
            by_layer[layer_of(module)].append(per_module(calls[:steps]))
        return {layer: torch.stack(ws).mean(0) for layer, ws in sorted(by_layer.items())}

    def to_dict(self, row: int = 0) -> dict:
        """One batch row: ``layers`` (per layer, per position), ``steps`` (per forward call,
        mean over layers), ``step_layers`` (the same per layer) as ``[..][E]`` lists; and for
        sequence-level Arrow, ``sequence``: the experts each call chose for the row, with
        weights."""
        steps = self.step_weights()  # [batch, steps, E]
        batch = max(len(steps), 1)
        return {
            "experts": list(self.expert_names),
            "layers": {str(layer): w[row].tolist() for layer, w in self.layer_weights().items()},
            "steps": steps[row].tolist() if len(steps) else [],
            "step_layers": {
                str(layer): w[row].tolist() for layer, w in self.step_layer_weights().items()
            },
            "sequence": [self._chosen(choice, row, batch) for choice in self.choices],
        }

    def _chosen(self, choice: SequenceChoice, row: int, batch: int) -> dict[str, float]:
        """A row's sequence choice as ``{expert: weight}`` (generate may repeat each row)."""
        source = row * len(choice.index) // max(batch, len(choice.index))  # rows repeated alike
        pairs = zip(choice.index[source].tolist(), choice.weights[source].tolist(), strict=True)
        return {self.expert_names[e]: float(w) for e, w in pairs}
