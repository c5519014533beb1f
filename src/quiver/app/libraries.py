"""What the Library tab does, without the UI: compose, describe, cluster, add prototypes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from quiver.errors import IncompatibleExpertError, InvalidInputError
from quiver.registry import Library, Registry
from quiver.routing import compute_arrow_prototypes, save_prototypes
from quiver.routing.arrow import ARTIFACT_NAME
from quiver.training import Clustering, cluster_experts


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
    return Library.create(
        target,
        repo_id,
        base_model=first.base_model,
        description=description,
        experts={expert.name: expert for expert in experts},
        bundle=target.location != source.location,
    )


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


def cluster_library(library: Library, k: int | None = None) -> Clustering:
    """MBC's clusters of the library's experts by the cosine of their weight updates
    (``quiver.training``), with ``k`` clusters, or as many as the silhouette suggests."""
    if len(library.names) < 2:
        raise InvalidInputError(
            f"library {library.repo_id} has fewer than two experts: nothing to compare",
            hint="add experts to the library",
        )
    return cluster_experts(library, k=k or None)


def cluster_rows(clustering: Clustering) -> list[list[str]]:
    """One table row per cluster: its name and its experts."""
    return [[name, ", ".join(experts)] for name, experts in clustering.clusters.items()]


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
