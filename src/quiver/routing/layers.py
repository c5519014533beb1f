"""Routed layers: a base Linear/Conv1D plus what the experts chosen for each token add to it.

A ``RoutedLinear`` asks its mixer two things for the flattened tokens ``x [N, in]``: which experts
each token uses (``index, weights [N, k]``) and the resulting update. Routed mixers compute only the
k chosen experts: token/expert pairs are sorted by expert, so each expert used does one small
matmul on its own tokens. Time and memory grow with ``N * k * (in + r + out)`` plus the routing
product ``N * E * in``, never with ``N * E * out`` as when every expert runs on every token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quiver.errors import RoutingError

Recorder = Callable[[str, torch.Size, torch.Tensor, torch.Tensor], None]


def _per_expert(rows: torch.Tensor, matrices: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``rows`` grouped by expert (sizes ``counts``), each group times its expert's matrix^T."""
    groups = rows.split(counts)
    return torch.cat([groups[e] @ matrices[e].mT for e, count in enumerate(counts) if count])


def mix_lowrank(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    *,
    mix_parameters: bool = False,
) -> torch.Tensor:
    """Weighted LoRA update of each token by its chosen experts.

    ``x [N, in]``, ``lora_a [E, r, in]``, ``lora_b [E, out, r]`` (already scaled), ``index`` and
    ``weights`` ``[N, k]``. Output mixing: ``sum_j w_j B_j A_j x``. Parameter mixing (mttl):
    ``(sum_j w_j B_j) (sum_j w_j A_j) x``, cross terms included.
    """
    tokens, k = index.shape
    if tokens == 0:
        return x.new_zeros(0, lora_b.shape[1])
    pairs = index.reshape(-1)
    order = pairs.argsort(stable=True)
    counts = torch.bincount(pairs, minlength=lora_a.shape[0]).tolist()
    rows = order // k
    pair_weights = weights.reshape(-1, 1)[order]
    codes = _per_expert(x.index_select(0, rows), lora_a, counts)  # [N * k, r]
    if mix_parameters:  # every chosen B reads the same mixed code (sum_j w_j A_j) x
        mixed = codes.new_zeros(tokens, codes.shape[1]).index_add_(0, rows, codes * pair_weights)
        codes = mixed.index_select(0, rows)
    updates = _per_expert(codes * pair_weights, lora_b, counts)  # [N * k, out]
    return updates.new_zeros(tokens, updates.shape[1]).index_add_(0, rows, updates)


class Mixer(nn.Module):
    """Holds LoRA factors as buffers (they follow ``.to()``, carry no gradient)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)


class ArrowMixer(Mixer):
    """Arrow: per token, ``|x . p_e| / T`` over the prototypes, top-k, softmax over those k."""

    def __init__(self, lora_a, lora_b, prototypes, *, top_k, temperature, mix_parameters):
        super().__init__(lora_a, lora_b)
        self.register_buffer("prototypes", prototypes, persistent=False)
        self.top_k, self.temperature, self.mix_parameters = top_k, temperature, mix_parameters

    def select(self, x: torch.Tensor, batch_shape: torch.Size):
        top, index = (x @ self.prototypes.mT).abs().topk(self.top_k, dim=-1)
        return index, (top / self.temperature).softmax(dim=-1)

    def forward(self, x, index, weights):
        return mix_lowrank(
            x, self.lora_a, self.lora_b, index, weights, mix_parameters=self.mix_parameters
        )


class OracleMixer(Mixer):
    """The caller names the expert (one for all rows, or one per batch row) via ``rows``."""

    def __init__(self, lora_a, lora_b):
        super().__init__(lora_a, lora_b)
        self.rows: torch.Tensor | None = None

    def select(self, x: torch.Tensor, batch_shape: torch.Size):
        if self.rows is None:
            raise RoutingError(
                "oracle routing has no expert to use",
                hint="run the model inside `with routed.use_expert(name):`",
            )
        batch = batch_shape[0] if len(batch_shape) > 1 else 1
        if len(self.rows) not in (1, batch):
            raise RoutingError(
                f"use_expert() named {len(self.rows)} experts for a batch of {batch} rows",
                hint="name one expert, or one per batch row",
            )
        per_row = self.rows.to(x.device).expand(batch)
        index = per_row.reshape(batch, *([1] * (len(batch_shape) - 1))).expand(batch_shape)
        index = index.reshape(-1, 1)
        return index, x.new_ones(index.shape)

    def forward(self, x, index, weights):
        return mix_lowrank(x, self.lora_a, self.lora_b, index, weights)


class MergedMixer(Mixer):
    """A fixed combination of the experts folded into one LoRA ``(A [r', in], B [out, r'])``."""

    def __init__(self, lora_a, lora_b, expert_weights):
        super().__init__(lora_a, lora_b)
        self.register_buffer("expert_weights", expert_weights, persistent=False)

    def select(self, x: torch.Tensor, batch_shape: torch.Size):
        experts = len(self.expert_weights)
        index = torch.arange(experts, device=x.device).expand(x.shape[0], experts)
        return index, self.expert_weights.to(x.dtype).expand(x.shape[0], experts)

    def forward(self, x, index, weights):
        return (x @ self.lora_a.mT) @ self.lora_b.mT


class RoutedLinear(nn.Module):
    """Wraps a base ``nn.Linear`` or GPT-2 ``Conv1D``; adds the mixer's update to its output."""

    def __init__(self, base_layer: nn.Module, name: str, mixer: nn.Module) -> None:
        super().__init__()
        self.base_layer, self.name, self.mixer = base_layer, name, mixer
        self.recorder: Recorder | None = None  # set while a RoutingTrace records

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1])
        index, weights = self.mixer.select(flat, x.shape[:-1])
        if self.recorder is not None:
            self.recorder(self.name, x.shape[:-1], index, weights)
        return out + self.mixer(flat, index, weights).view_as(out).to(out.dtype)
