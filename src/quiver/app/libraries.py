"""What the Library tab does, without the UI: compose, describe, compare, add prototypes, push."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from quiver.errors import IncompatibleExpertError, InvalidInputError
from quiver.registry import Library, Registry
from quiver.routing import ExpertSet, compute_arrow_prototypes, load_experts, save_prototypes
from quiver.routing.arrow import ARTIFACT_NAME


def compose(
    target: Registry, repo_id: str, source: Registry, expert_ids: list[str], description: str = ""
) -> Library:
    """A new library ``repo_id`` in ``target`` of experts from ``source`` (referenced when both
    are the same registry, copied in otherwise). Every expert is pulled and checked against the
    first before anything is written."""
    if not expert_ids:
        raise InvalidInputError("no experts chosen", hint="choose the experts to compose from")
    experts = [source.pull(expert_id) for expert_id in expert_ids]
    first = experts[0].card
    for expert in experts[1:]:
        expert.check_fits(
            base_model=first.base_model, rank=first.rank, target_modules=first.target_modules
        )
    names = [expert.name for expert in experts]
    if len(set(names)) < len(names):
        raise IncompatibleExpertError(
            f"two chosen experts share a name: {sorted(names)}",
            hint="compose from experts with distinct names",
        )
    library = Library.create(target, repo_id, base_model=first.base_model, description=description)
    bundle = target.location != source.location
    for expert in experts:
        library.add(expert, bundle=bundle)
    return library


def expert_rows(library: Library) -> list[list[str]]:
    """One table row per expert: name, where it comes from, its pinned weights."""
    return [
        [
            pin.name,
            "bundled" if pin.bundled else f"{pin.repo_id}@{pin.commit[:10]}",
            pin.sha256[:16],
        ]
        for pin in library.experts
    ]


def expert_similarity(experts: ExpertSet) -> torch.Tensor:
    """Pairwise cosine similarity ``[E, E]`` of the experts' weight updates ``s B A``, all modules
    pooled, from the low-rank factors: ``<B_i A_i, B_j A_j> = tr((B_i^T B_j)(A_j A_i^T))``."""
    count = len(experts.names)
    inner = torch.zeros(count, count, dtype=torch.float64)
    for stack in experts.modules.values():
        lora_a, lora_b = stack.A.double(), stack.scaled_B().double()
        b_gram = torch.einsum("ior,jos->ijrs", lora_b, lora_b)  # B_i^T B_j
        a_gram = torch.einsum("irk,jsk->ijrs", lora_a, lora_a)  # A_i A_j^T
        inner += (b_gram * a_gram).sum((2, 3))
    norms = inner.diagonal().sqrt().clamp_min(1e-30)
    return (inner / norms[:, None] / norms[None, :]).float()


def library_similarity(library: Library) -> torch.Tensor:
    return expert_similarity(load_experts(library, dtype=torch.float32))


def store_prototypes(library: Library) -> Library:
    """Compute the exact Arrow prototypes and commit them to the library as an artifact."""
    if not library.names:
        raise InvalidInputError(
            f"library {library.repo_id} has no experts", hint="add experts before prototypes"
        )
    with tempfile.TemporaryDirectory(prefix="quiver-prototypes-") as scratch:
        path = save_prototypes(
            compute_arrow_prototypes(library), Path(scratch) / f"{ARTIFACT_NAME}.safetensors"
        )
        return library.add_artifact(ARTIFACT_NAME, path, message="Add Arrow prototypes")
