"""Routed layers: a base Linear/Conv1D plus what the experts chosen for each token add to it.

A ``RoutedLinear`` asks its mixer two things for the flattened tokens ``x [N, in]``: which experts
each token uses (``index, weights [N, k]``), then to add their update to the base output. Routed
mixers touch only the k chosen experts' factors, so time grows with ``N * k * r * (in + out)``
plus the routing product ``N * E * in``, and memory with ``N * k * r``: never ``N * E * out`` as
when every expert runs on every token. On the CPU in float32 the fused kernels of ``kernels.py``
do the work; elsewhere two fused torch ops (``embedding_bag`` and its transpose) do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quiver.errors import RoutingError
from quiver.routing import kernels
from quiver.routing.experts import LoraStack

Recorder = Callable[[str, torch.Size, torch.Tensor, torch.Tensor], None]


def _row_dots(x: torch.Tensor, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[t, j] = table[rows[t, j]] . x[t]``, without gathering the rows into memory.

    This is the transpose of ``embedding_bag`` (its gradient with respect to per-sample weights),
    which ATen exposes as one fused kernel.
    """
    tokens, per_token = rows.shape
    offsets = torch.arange(0, tokens * per_token, per_token, device=x.device)
    bags = torch.arange(tokens, device=x.device).repeat_interleave(per_token)
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x.contiguous(), table, rows.reshape(-1), offsets, bags, 0, -1
    )
    return dots.view(tokens, per_token)


def mix_lowrank(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    *,
    rank: int,
    mix_parameters: bool = False,
) -> torch.Tensor:
    """Weighted LoRA update of each token ``x [N, in]`` by its chosen experts ``index [N, k]``.

    The experts' rank-``r`` factors come as rows: ``a_rows [E * r, in]`` (the A_e stacked) and
    ``b_rows [E * r, out]`` (the scaled B_e transposed and stacked). Output mixing:
    ``sum_j w_j B_j A_j x``. Parameter mixing (mttl): ``(sum_j w_j B_j) (sum_j w_j A_j) x``.
    """
    tokens, k = index.shape
    rows = (index[..., None] * rank + torch.arange(rank, device=index.device)).view(tokens, -1)
    codes = _row_dots(x, a_rows, rows).view(tokens, k, rank)  # A_j x for each chosen j
    if mix_parameters:  # every chosen B reads the same mixed code (sum_j w_j A_j) x
        codes = (weights[..., None] * codes).sum(1, keepdim=True)
    scaled = (weights[..., None] * codes).view(tokens, -1)
    return F.embedding_bag(rows, b_rows, per_sample_weights=scaled, mode="sum")


class Mixer(nn.Module):
    """Decides, per token, which experts a layer uses (``select``) and adds their update to the
    base output (``update_``); ``route_`` does both."""

    def route_(self, out: torch.Tensor, x: torch.Tensor, batch_shape: torch.Size):
        """``out [N, out] +=`` the update of ``x [N, in]``; returns ``index, weights [N, k]``."""
        index, weights = self.select(x, batch_shape)
        self.update_(out, x, index, weights)
        return index, weights


class LowRankMixer(Mixer):
    """Holds the experts' factors as rows ``A [E * r, in]`` and ``s B^T [E * r, out]`` (buffers)."""

    mix_parameters = False

    def __init__(self, stack: LoraStack) -> None:
        super().__init__()
        experts, out_features, self.rank = stack.B.shape
        b_rows = stack.B.new_empty(experts, self.rank, out_features)
        torch.mul(stack.B.mT, stack.scales.to(stack.B)[:, None, None], out=b_rows)
        self.register_buffer("a_rows", stack.A.flatten(0, 1).contiguous(), persistent=False)
        self.register_buffer("b_rows", b_rows.flatten(0, 1), persistent=False)

    def update_(self, out, x, index, weights) -> None:
        factors = (self.a_rows, self.b_rows, index, weights)
        options = dict(rank=self.rank, mix_parameters=self.mix_parameters)
        if kernels.applicable(out, x):
            kernels.lowrank_add_(out, x, *factors, **options)
        else:
            out.add_(mix_lowrank(x, *factors, **options))


class ArrowMixer(LowRankMixer):
    """Arrow: per token, ``|x . p_e| / T`` over the prototypes, top-k, softmax over those k."""

    def __init__(self, stack, prototypes, *, top_k, temperature, mix_parameters):
        super().__init__(stack)
        self.register_buffer("prototypes", prototypes, persistent=False)
        self.register_buffer("panel", kernels.prototype_panel(prototypes), persistent=False)
        self.top_k, self.temperature, self.mix_parameters = top_k, temperature, mix_parameters

    def select(self, x: torch.Tensor, batch_shape: torch.Size):
        top, index = (x @ self.prototypes.mT).abs().topk(self.top_k, dim=-1)
        return index, (top / self.temperature).softmax(dim=-1)

    def route_(self, out, x, batch_shape):
        if not kernels.applicable(out, x):
            return super().route_(out, x, batch_shape)
        return kernels.arrow_add_(
            out,
            x,
            self.panel,
            self.a_rows,
            self.b_rows,
            top_k=self.top_k,
            temperature=self.temperature,
            rank=self.rank,
            mix_parameters=self.mix_parameters,
        )


class OracleMixer(LowRankMixer):
    """The caller names the expert (one for all rows, or one per batch row) via ``rows``."""

    def __init__(self, stack):
        super().__init__(stack)
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


class MergedMixer(Mixer):
    """A fixed combination of the experts folded into one LoRA ``(A [r', in], B [out, r'])``."""

    def __init__(self, lora_a, lora_b, expert_weights):
        super().__init__()
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.register_buffer("expert_weights", expert_weights, persistent=False)

    def select(self, x: torch.Tensor, batch_shape: torch.Size):
        experts = len(self.expert_weights)
        index = torch.arange(experts, device=x.device).expand(x.shape[0], experts)
        return index, self.expert_weights.to(x.dtype).expand(x.shape[0], experts)

    def update_(self, out, x, index, weights) -> None:
        out.addmm_(x @ self.lora_a.mT, self.lora_b.mT)


class RoutedLinear(nn.Module):
    """Wraps a base ``nn.Linear`` or GPT-2 ``Conv1D``; adds the mixer's update to its output.

    For inference: the experts are frozen buffers and the fused kernels carry no gradient.
    """

    def __init__(self, base_layer: nn.Module, name: str, mixer: Mixer) -> None:
        super().__init__()
        self.base_layer, self.name, self.mixer = base_layer, name, mixer
        self.recorder: Recorder | None = None  # set while a RoutingTrace records

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x).contiguous()
        flat = x.reshape(-1, x.shape[-1])
        index, weights = self.mixer.route_(out.view(-1, out.shape[-1]), flat, x.shape[:-1])
        if self.recorder is not None:
            self.recorder(self.name, x.shape[:-1], index, weights)
        return out
