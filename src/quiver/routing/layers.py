"""Routed layers: a base Linear/Conv1D plus what the experts chosen for each token add to it.

A ``RoutedLinear`` asks its mixer two things for the flattened tokens ``x [N, in]``: which experts
each token uses (``index, weights [N, k]``), then to add their update to the base output. Routed
mixers touch only the k chosen experts' factors, so time grows with ``N * k * r * (in + out)``
plus the routing product ``N * E * in``, and memory with ``N * k * r``: never ``N * E * out`` as
when every expert runs on every token. The work goes through the ``quiver::`` custom ops of
``ops.py`` (the fused kernels of ``kernels.py`` on the CPU in float32, fused torch ops elsewhere);
while autograd records, through the portable torch functions, which carry gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from quiver.errors import RoutingError
from quiver.routing import context, kernels, ops
from quiver.routing.context import CallState, batch_rows
from quiver.routing.experts import LoraStack

Choice = tuple[torch.Tensor, torch.Tensor]  # index [N, k] (int64), weights [N, k]


def _records_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Mixer(nn.Module, ABC):
    """Decides, per token, which experts a layer uses (``select``) and adds their update to the
    base output (``update_``); ``route_`` does both. ``call`` is the calling context's state
    (``context.py``): what a caller chose for this call only (the oracle's or a sequence's
    experts)."""

    @abstractmethod
    def select(self, x: torch.Tensor, batch_shape: torch.Size, call: CallState) -> Choice:
        """The experts each token of ``x [N, in]`` uses and their weights, ``[N, k]`` each;
        ``batch_shape`` is the shape of the tokens before flattening (e.g. ``[batch, seq]``)."""

    @abstractmethod
    def update_(
        self, out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """``out [N, out] +=`` the chosen experts' update of ``x [N, in]``."""

    def route_(
        self, out: torch.Tensor, x: torch.Tensor, batch_shape: torch.Size, call: CallState
    ) -> Choice:
        """``out [N, out] +=`` the update of ``x [N, in]``; returns ``index, weights [N, k]``."""
        index, weights = self.select(x, batch_shape, call)
        self.update_(out, x, index, weights)
        return index, weights


class LowRankMixer(Mixer):
    """Holds the experts' factors as rows ``A [E * r, in]`` and ``s B^T [E * r, out]`` (buffers)."""

    mix_parameters = False

    def __init__(self, stack: LoraStack) -> None:
        super().__init__()
        experts, out_features, self.rank = stack.B.shape
        if stack.B.device.type == "cpu":
            kernels.cpu_kernels()  # the fused CPU kernels, built on first use
        b_rows = stack.B.new_empty(experts, self.rank, out_features)
        torch.mul(stack.B.mT, stack.scales.to(stack.B)[:, None, None], out=b_rows)
        self.register_buffer("a_rows", stack.A.flatten(0, 1).contiguous(), persistent=False)
        self.register_buffer("b_rows", b_rows.flatten(0, 1), persistent=False)

    def update_(self, out, x, index, weights) -> None:
        factors = (self.a_rows, self.b_rows, index, weights)
        options = dict(rank=self.rank, mix_parameters=self.mix_parameters)
        if _records_grad(out, x):
            out.add_(ops.mix_lowrank(x, *factors, **options))
        else:
            ops.lowrank_add_(out, x, *factors, **options)


class ArrowMixer(LowRankMixer):
    """Arrow: per token, ``|x . p_e| / T`` over the prototypes, top-k, softmax over those k."""

    def __init__(self, stack, prototypes, *, top_k, temperature, mix_parameters):
        super().__init__(stack)
        self.register_buffer("prototypes", prototypes, persistent=False)
        self.register_buffer("panel", ops.prototype_panel(prototypes), persistent=False)
        self.top_k, self.temperature, self.mix_parameters = top_k, temperature, mix_parameters

    def select(self, x: torch.Tensor, batch_shape: torch.Size, call: CallState) -> Choice:
        return ops.arrow_choice(x, self.prototypes, self.top_k, self.temperature)

    def route_(self, out, x, batch_shape, call):
        if _records_grad(out, x):
            return super().route_(out, x, batch_shape, call)
        return ops.arrow_add_(
            out,
            x,
            self.prototypes,
            self.panel,
            self.a_rows,
            self.b_rows,
            top_k=self.top_k,
            temperature=self.temperature,
            rank=self.rank,
            mix_parameters=self.mix_parameters,
        )


class SequenceArrowMixer(LowRankMixer):
    """Arrow per sequence: every token of a row uses the experts its prompt chose
    (``call.choice``, made by ``RoutedModel`` from ``prompt_scores`` on a no-expert pass)."""

    def __init__(self, stack, prototypes, *, mix_parameters, scores_prompt=True):
        super().__init__(stack)
        self.register_buffer("prototypes", prototypes, persistent=False)
        self.mix_parameters = mix_parameters
        self.scores_prompt = scores_prompt  # False: a module outside Arrow.prompt_layers

    def prompt_scores(self, x: torch.Tensor) -> torch.Tensor | None:
        """``|x . p_e|`` for every token of ``x [N, in]`` and expert: ``[N, E]`` (None where
        this module does not score prompts)."""
        return (x @ self.prototypes.mT).abs() if self.scores_prompt else None

    def select(self, x: torch.Tensor, batch_shape: torch.Size, call: CallState) -> Choice:
        if call.choice is None:
            raise RoutingError(
                "sequence-level Arrow has no experts chosen for this call",
                hint="call the routed model (routed(...), routed.generate(...)), not its inner "
                "model, so the prompt is scored first",
            )
        return call.choice.per_token(batch_shape, x)


class OracleMixer(LowRankMixer):
    """The caller names the expert (one for all rows, or one per batch row) for its call:
    ``call.oracle_rows``, set by ``routed.use_expert``."""

    def select(self, x: torch.Tensor, batch_shape: torch.Size, call: CallState) -> Choice:
        rows = call.oracle_rows
        if rows is None:
            raise RoutingError(
                "oracle routing has no expert to use",
                hint="run the model inside `with routed.use_expert(name):`",
            )
        batch = batch_rows(batch_shape)
        if len(rows) not in (1, batch):
            raise RoutingError(
                f"use_expert() named {len(rows)} experts for a batch of {batch} rows",
                hint="name one expert, or one per batch row",
            )
        per_row = rows.to(x.device).expand(batch)
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

    def select(self, x: torch.Tensor, batch_shape: torch.Size, call: CallState) -> Choice:
        experts = len(self.expert_weights)
        index = torch.arange(experts, device=x.device).expand(x.shape[0], experts)
        return index, self.expert_weights.to(x.dtype).expand(x.shape[0], experts)

    def update_(self, out, x, index, weights) -> None:
        out.addmm_(x @ self.lora_a.mT, self.lora_b.mT)


class RoutedLinear(nn.Module):
    """Wraps a base ``nn.Linear`` or GPT-2 ``Conv1D``; adds the mixer's update to its output.

    For inference: the experts are frozen buffers and the fused kernels carry no gradient.
    Per-call state (trace, oracle rows, sequence choices) comes from the calling context of
    routed model ``owner``, never from the layer, so concurrent calls do not mix.
    """

    def __init__(self, base_layer: nn.Module, name: str, mixer: Mixer | None, owner: int) -> None:
        super().__init__()
        self.base_layer, self.name, self.mixer, self.owner = base_layer, name, mixer, owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x).contiguous()
        call = context.current(self.owner)
        mixer = self.mixer if call.mixers is None else call.mixers.get(self.name)
        if mixer is None:  # a strategy that leaves this module alone (the base model)
            return out
        flat, batch_shape = x.reshape(-1, x.shape[-1]), x.shape[:-1]
        if call.scoring is not None:  # a no-expert pass over a prompt: score it, add nothing
            scores = mixer.prompt_scores(flat)
            if scores is not None:
                call.scoring.add(scores)
            return out
        index, weights = mixer.route_(out.view(-1, out.shape[-1]), flat, batch_shape, call)
        if call.trace is not None:
            call.trace.record(self.name, batch_shape, index, weights)
        return out
