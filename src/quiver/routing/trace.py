"""A record of routing decisions: which experts each token used, and with what weight.

Structure (all tensors float32 on CPU, ``E`` = number of experts, in ``expert_names`` order):

- ``trace.module_weights(name)``: ``[batch, tokens, E]`` for one routed module; a row sums to 1
  for Arrow (top-k softmax, zeros elsewhere) and oracle, and to the merge weights for merges.
- ``trace.layer_weights()``: ``{layer: [batch, tokens, E]}``, the mean over that layer's modules
  (layer = the first number in the module path, e.g. ``model.layers.3.mlp.up_proj`` -> 3).
- ``trace.to_dict(row)``: the same per layer for one batch row as nested lists, ready for JSON
  or a heatmap (layers x tokens x experts).

``tokens`` counts every position the model saw while recording, in order: for ``generate`` the
prompt (including padding), then one position per decoding step (every generated token but the
last, which no forward pass reads).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(module: str) -> int:
    """The block number of a module path, or -1 for modules outside numbered blocks."""
    match = _LAYER_NUMBER.search(module)
    return int(match.group(1)) if match else -1


class RoutingTrace:
    """Filled by a routed model inside ``with routed.trace() as trace:``."""

    def __init__(self, expert_names: tuple[str, ...]) -> None:
        self.expert_names = expert_names
        self._calls: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(self, module: str, shape: torch.Size, index: torch.Tensor, weights: torch.Tensor):
        dense = torch.zeros(index.shape[0], len(self.expert_names))
        dense.scatter_(1, index.detach().cpu(), weights.detach().float().cpu())
        batch_shape = shape if len(shape) > 1 else (1, *shape)
        self._calls[module].append(dense.view(*batch_shape, -1))

    @property
    def modules(self) -> list[str]:
        return list(self._calls)

    def module_weights(self, module: str) -> torch.Tensor:
        return torch.cat(self._calls[module], dim=1)

    def layer_weights(self) -> dict[int, torch.Tensor]:
        by_layer = defaultdict(list)
        for module in self._calls:
            by_layer[layer_of(module)].append(self.module_weights(module))
        return {layer: torch.stack(ws).mean(0) for layer, ws in sorted(by_layer.items())}

    def to_dict(self, row: int = 0) -> dict:
        return {
            "experts": list(self.expert_names),
            "layers": {str(layer): w[row].tolist() for layer, w in self.layer_weights().items()},
        }
