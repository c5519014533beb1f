"""Arrow prototypes, exact and cheap, and GenKnowSub.

An expert's prototype at a module is the top right singular vector of ``B @ A``. With the thin QR
factorisation ``A^T = Q_A R_A``, ``B @ A = (B R_A^T) Q_A^T``; the top eigenvector ``v`` of the
small ``r x r`` matrix ``R_A (B^T B) R_A^T`` gives the exact answer ``Q_A v`` without ever
forming the ``out x in`` matrix (PEFT approximates it with 15 power iterations).
Prototypes are stored as one safetensors file so a pulled library routes without recomputing them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quiver.errors import IncompatibleExpertError, InvalidAdapterError
from quiver.fs import atomic_path
from quiver.routing.experts import ExpertSet, ExpertSource, LoraStack, load_experts

ARTIFACT_NAME = "arrow_prototypes"


def top_right_singular_vectors(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Unit top right singular vectors of ``B_e @ A_e`` for ``A [E, r, in]``, ``B [E, out, r]``.

    The factors are used in (at least) float32 and the ``r x r`` eigenproblem in float64; the sign
    is fixed so the largest entry is positive (routing takes absolute values, this only makes the
    artifact reproducible).
    """
    dtype = torch.promote_types(lora_a.dtype, torch.float32)
    q_a, r_a = torch.linalg.qr(lora_a.to(dtype).mT)  # A^T = Q_A R_A: [E, in, r], [E, r, r]
    b_gram = lora_b.to(dtype).mT @ lora_b.to(dtype)  # B^T B: [E, r, r]
    core_gram = (r_a @ b_gram @ r_a.mT).double()  # (B R_A^T)^T (B R_A^T), as B @ A = B R_A^T Q_A^T
    _, eigenvectors = torch.linalg.eigh(core_gram)
    vectors = (q_a @ eigenvectors[:, :, -1:].to(dtype)).squeeze(-1)  # [E, in]
    largest = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    return (vectors * largest.sign()).to(lora_a.dtype)


@dataclass(frozen=True)
class ArrowPrototypes:
    """Per target module, one prototype row per expert: ``vectors[module]`` is ``[E, in]``."""

    expert_names: tuple[str, ...]
    vectors: dict[str, torch.Tensor]

    def check_matches(self, experts: ExpertSet) -> None:
        """Refuse prototypes that were computed for other experts, modules or shapes."""
        if self.expert_names != experts.names:
            raise IncompatibleExpertError(
                f"stored Arrow prototypes are for experts {list(self.expert_names)}, "
                f"not {list(experts.names)}",
                hint="recompute them with compute_arrow_prototypes() for this library",
            )
        for module, stack in experts.modules.items():
            expected = (len(experts.names), stack.in_features)
            found = self.vectors.get(module)
            if found is None or tuple(found.shape) != expected:
                raise IncompatibleExpertError(
                    f"stored Arrow prototypes do not cover {module} with shape {expected}",
                    hint="recompute them with compute_arrow_prototypes() for this library",
                )


def compute_arrow_prototypes(experts: ExpertSource | ExpertSet) -> ArrowPrototypes:
    """Exact Arrow prototypes of a library (no base model needed), ready for ``save_prototypes``."""
    if not isinstance(experts, ExpertSet):
        experts = load_experts(experts, dtype=torch.float32)
    vectors = {m: top_right_singular_vectors(s.A, s.B) for m, s in experts.modules.items()}
    return ArrowPrototypes(experts.names, vectors)


def save_prototypes(prototypes: ArrowPrototypes, path: str | Path) -> Path:
    """Write prototypes as one safetensors file, atomically (temp file, then rename)."""
    path = Path(path)
    tensors = {m: v.detach().float().cpu().contiguous() for m, v in prototypes.vectors.items()}
    metadata = {"quiver_artifact": ARTIFACT_NAME, "experts": json.dumps(prototypes.expert_names)}
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata=metadata)
    return path


def load_prototypes(path: str | Path) -> ArrowPrototypes:
    """Read prototypes written by ``save_prototypes``."""
    try:
        with safe_open(str(path), framework="pt") as stored:
            metadata = stored.metadata() or {}
            vectors = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own types for missing or corrupt files
        raise InvalidAdapterError(f"cannot read Arrow prototypes at {path}: {error}") from error
    if metadata.get("quiver_artifact") != ARTIFACT_NAME or "experts" not in metadata:
        raise InvalidAdapterError(
            f"{path} is not an Arrow prototypes file",
            hint="write it with quiver.routing.save_prototypes()",
        )
    return ArrowPrototypes(tuple(json.loads(metadata["experts"])), vectors)


def genknowsub(experts: ExpertSet, general: ExpertSet) -> ExpertSet:
    """Subtract the general experts' mean A and mean B from every task expert (GenKnowSub)."""
    experts.require_uniform_rank("GenKnowSub")
    general.require_uniform_rank("GenKnowSub")
    modules = {}
    for module, stack in experts.modules.items():
        common = general.modules.get(module)
        if common is None or common.A.shape[1:] != stack.A.shape[1:]:
            raise IncompatibleExpertError(
                f"the general experts do not match the task experts at {module}",
                hint="GenKnowSub needs general LoRAs with the same modules, shapes and rank",
            )
        lora_a = stack.A - common.A.mean(0).to(stack.A)
        lora_b = stack.B - common.B.mean(0).to(stack.B)
        modules[module] = LoraStack(lora_a, lora_b, stack.scales, stack.ranks)
    return ExpertSet(experts.names, modules)
