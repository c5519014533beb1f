"""Read a set of PEFT LoRA folders in one pass and stack them per target module.

An expert is a plain PEFT folder: ``adapter_config.json`` (peft_type LORA) and
``adapter_model.safetensors``, checked by the registry's one adapter check
(``quiver.registry.adapter``) before its tensors are read. Stacking turns E experts into two
tensors per module, ``A [E, r, in]`` and ``B [E, out, r]`` (ranks zero-padded to the largest,
which leaves ``B @ A`` unchanged), plus each expert's LoRA scale, so a routed layer never loops
over adapter objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from quiver.errors import IncompatibleExpertError, InvalidAdapterError, RoutingError
from quiver.registry.adapter import WEIGHTS, read_adapter


@runtime_checkable
class HasExpertPaths(Protocol):
    """What routing needs from a library: its experts' local folders, in order."""

    def expert_paths(self) -> dict[str, Path]: ...


ExpertSource = Mapping[str, str | Path] | Sequence[str | Path] | HasExpertPaths


def resolve_expert_paths(source: ExpertSource) -> dict[str, Path]:
    """Normalise a library, a ``name -> folder`` mapping or folders to ``name -> Path``."""
    if isinstance(source, HasExpertPaths):
        paths = dict(source.expert_paths())
    elif isinstance(source, Mapping):
        paths = dict(source)
    elif isinstance(source, (str, Path)):
        raise RoutingError(
            f"expected several experts, got the single path {str(source)!r}",
            hint="pass a list of folders, a name -> folder mapping, or a library",
        )
    else:
        paths = {}
        for folder in source:
            name = Path(folder).name
            if name in paths:
                raise RoutingError(
                    f"two expert folders are both named {name!r}",
                    hint="pass a name -> folder mapping to give them distinct names",
                    expert=name,
                )
            paths[name] = folder
    if not paths:
        raise RoutingError("no experts given", hint="pass at least one PEFT LoRA folder")
    return {str(name): Path(path) for name, path in paths.items()}


def expert_index(names: Sequence[str], name: str) -> int:
    if name not in names:
        raise RoutingError(
            f"unknown expert {name!r}", hint=f"choose one of {', '.join(names)}", expert=name
        )
    return list(names).index(name)


@dataclass(frozen=True)
class LoraStack:
    """One target module's experts: ``A [E, r, in]``, unscaled ``B [E, out, r]``, ``scales [E]``."""

    A: torch.Tensor
    B: torch.Tensor
    scales: torch.Tensor
    ranks: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return self.A.shape[-1]

    def scaled_B(self) -> torch.Tensor:
        """``s_e * B_e`` for every expert: the LoRA scale folded into B."""
        return self.B * self.scales.to(self.B.dtype)[:, None, None]


@dataclass(frozen=True)
class ExpertSet:
    """E experts stacked per target module, all shaped alike and in the same module order."""

    names: tuple[str, ...]
    modules: dict[str, LoraStack]

    def index(self, name: str) -> int:
        return expert_index(self.names, name)

    def require_uniform_rank(self, method: str) -> None:
        """Element-wise methods (parameter mixing, merges, GenKnowSub) need equal ranks."""
        for module, stack in self.modules.items():
            for name, rank in zip(self.names, stack.ranks, strict=True):
                if rank != stack.ranks[0]:
                    raise IncompatibleExpertError(
                        f"expert {name!r} has rank {rank} at {module} but {self.names[0]!r} has "
                        f"rank {stack.ranks[0]}; {method} adds A and B matrices element-wise",
                        hint="use output mixing, or experts trained with the same rank",
                        expert=name,
                    )


def read_expert(name: str, folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``module -> (A, B, scale)`` of one PEFT LoRA folder, checked as the registry checks it."""
    label = f"expert {name!r}"
    _, modules = read_adapter(folder, label)
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as weights:
            return {
                module: (weights.get_tensor(m.a_key), weights.get_tensor(m.b_key), m.scale)
                for module, m in modules.items()
            }
    except Exception as error:  # safetensors raises its own error types for corrupt data
        raise InvalidAdapterError(f"{label}: unreadable {folder / WEIGHTS}: {error}") from error


def _check_against_model(name: str, factors: dict, model: nn.Module) -> None:
    for module, (lora_a, lora_b, _) in factors.items():
        try:
            layer = model.get_submodule(module)
            layer = getattr(layer, "base_layer", layer)  # a routed layer: the one it wraps
        except AttributeError:
            raise IncompatibleExpertError(
                f"expert {name!r} targets {module}, which this {type(model).__name__} lacks",
                hint="use experts trained on this base model",
                expert=name,
            ) from None
        if isinstance(layer, nn.Linear):
            shape = (layer.in_features, layer.out_features)
        elif isinstance(layer, Conv1D):
            shape = tuple(layer.weight.shape)
        else:
            raise IncompatibleExpertError(
                f"expert {name!r} targets {module}, a {type(layer).__name__}",
                hint="routing supports LoRA on Linear and GPT-2 Conv1D layers only",
                expert=name,
            )
        if (lora_a.shape[1], lora_b.shape[0]) != shape:
            raise IncompatibleExpertError(
                f"expert {name!r} at {module} maps {lora_a.shape[1]} -> {lora_b.shape[0]} "
                f"features but the model's layer maps {shape[0]} -> {shape[1]}",
                hint="use experts trained on this base model (same architecture and size)",
                expert=name,
            )


def load_experts(
    source: ExpertSource,
    model: nn.Module | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ExpertSet:
    """Read and stack every expert; with ``model``, check each fits it and take its dtype/device."""
    paths = resolve_expert_paths(source)
    if model is not None:
        reference = next(model.parameters())
        dtype, device = dtype or reference.dtype, device or reference.device
    per_expert = {}
    for name, folder in tqdm(paths.items(), desc="loading experts", unit="expert", disable=None):
        factors = read_expert(name, folder)
        if model is not None:
            _check_against_model(name, factors, model)
        per_expert[name] = factors
    names = tuple(paths)
    first = per_expert[names[0]]
    for name in names[1:]:
        _check_same_modules(name, per_expert[name], names[0], first)
    modules = {}
    for module, (a0, b0, _) in first.items():
        ranks = tuple(per_expert[name][module][0].shape[0] for name in names)
        lora_a = torch.zeros(len(names), max(ranks), a0.shape[1], dtype=dtype or a0.dtype)
        lora_b = torch.zeros(len(names), b0.shape[0], max(ranks), dtype=dtype or b0.dtype)
        for i, name in enumerate(names):
            a, b, _ = per_expert[name][module]
            lora_a[i, : a.shape[0]] = a
            lora_b[i, :, : b.shape[1]] = b
        scales = torch.tensor([per_expert[name][module][2] for name in names])
        modules[module] = LoraStack(lora_a.to(device), lora_b.to(device), scales.to(device), ranks)
    return ExpertSet(names, modules)


def _check_same_modules(name: str, factors: dict, first_name: str, first: dict) -> None:
    missing, extra = sorted(set(first) - set(factors)), sorted(set(factors) - set(first))
    if missing or extra:
        raise IncompatibleExpertError(
            f"expert {name!r} targets different modules than {first_name!r}"
            + (f"; missing {missing[:3]}" if missing else "")
            + (f"; extra {extra[:3]}" if extra else ""),
            hint="route experts trained with the same target_modules",
            expert=name,
        )
    for module, (a, b, _) in factors.items():
        if (a.shape[1], b.shape[0]) != (first[module][0].shape[1], first[module][1].shape[0]):
            raise IncompatibleExpertError(
                f"expert {name!r} at {module} has shapes {tuple(a.shape)}/{tuple(b.shape)}, "
                f"unlike {first_name!r}",
                hint="route experts trained on the same base model",
                expert=name,
            )
