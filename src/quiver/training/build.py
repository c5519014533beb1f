"""Build an MBC library: cluster a set of experts, then make one expert per cluster.

With data (the paper's way), each cluster's expert is trained on the union of its tasks' data,
through ``train_experts`` (local or Ray). Without data (a pulled set whose data you do not have),
each cluster's experts are merged (``merge.py``). The new library's manifest and card record how
it was built (method, embedding, k, which experts and tasks each cluster holds) and it carries
Arrow prototypes as its ``arrow_prototypes`` artifact, ready to route.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quiver.errors import AlreadyExistsError, TrainingError
from quiver.registry import Expert, Library, Registry
from quiver.routing import compute_arrow_prototypes, load_experts, save_prototypes
from quiver.routing.arrow import ARTIFACT_NAME
from quiver.routing.experts import ExpertSource, resolve_expert_paths
from quiver.training.data import DataSource
from quiver.training.fanout import train_experts
from quiver.training.mbc import Clustering, cluster_experts
from quiver.training.merge import MERGES, write_merged_expert
from quiver.training.trainer import TrainConfig


def _member_ids(source: Any, names: list[str]) -> dict[str, str]:
    """Each expert's repo id (``library/experts/name`` when bundled), or its name."""
    if not isinstance(source, Library):
        return {name: name for name in names}
    return {pin.name: pin.repo_id or f"{source.repo_id}/{pin.subfolder}" for pin in source.experts}


def _cluster_tasks(paths: Mapping[str, Path], clustering: Clustering) -> dict[str, list[str]]:
    """The tasks each cluster covers: its members' card tasks (an expert without: its name)."""
    tasks = {}
    for cluster, members in clustering.clusters.items():
        found = []
        for name in members:
            found += Expert.from_folder(paths[name]).card.tasks or [name]
        tasks[cluster] = list(dict.fromkeys(found))
    return tasks


def _train_clusters(
    cluster_tasks, data, base_model, scratch, repo_id, registry, training
) -> dict[str, Expert]:
    """Train each cluster's expert on its tasks' data; those a Ray cluster's workers pushed to
    ``registry`` are pulled here."""
    missing = sorted({t for tasks in cluster_tasks.values() for t in tasks} - set(data))
    if missing:
        raise TrainingError(
            f"no data for the tasks {', '.join(missing)}",
            hint="give data for every task of every cluster (--data TASK=FILE)",
        )
    jobs = {c: {t: data[t] for t in tasks} for c, tasks in cluster_tasks.items()}
    remote = training.get("address") is not None
    prefix = repo_id.split("/", 1)[1]
    named = {f"{prefix}-{cluster}" if remote else cluster: job for cluster, job in jobs.items()}
    results = train_experts(
        base_model,
        named,
        output_dir=scratch,
        registry=registry if remote else None,
        namespace=repo_id.split("/", 1)[0] if remote else None,
        **training,
    )
    failed = [f"{r.name}: {r.error}" for r in results if not r.ok]
    if failed:
        raise TrainingError("some cluster experts failed to train: " + "; ".join(failed))
    return {
        cluster: registry.pull(result.repo_id, revision=result.commit) if remote else result.expert
        for cluster, result in zip(jobs, results, strict=True)
    }


def require_new_library(registry: Registry, repo_id: str) -> None:
    """Refuse a taken name, or a registry that will not take the library, before any work, not
    after hours of training."""
    registry.check_can_push(repo_id)
    if registry.head(repo_id) is not None:
        raise AlreadyExistsError(
            f"{repo_id} already exists in {registry.location}",
            hint="pick another name for the new library",
            repo_id=repo_id,
        )


def build_mbc_library(
    source: Library | ExpertSource,
    registry: Registry,
    repo_id: str,
    *,
    k: int | None = None,
    embedding: str = "update",
    seed: int = 0,
    data: Mapping[str, DataSource] | None = None,
    base_model: Any = None,
    tokenizer: Any = None,
    config: TrainConfig | None = None,
    backend: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    merge: str = "svd",
    description: str = "",
) -> Library:
    """Cluster ``source``'s experts with MBC and publish a library of one expert per cluster.

    With ``data`` (``task -> source``, every task of every expert covered), each cluster's expert
    is trained on its tasks' data from ``base_model`` (default: the experts' base model id), on
    ``backend``; on a Ray cluster (``address``) the workers push them to ``registry``. Without
    data, each cluster's experts are merged with ``merge`` (``"svd"``, ``"concat"`` or ``"mu"``).
    """
    require_new_library(registry, repo_id)
    if data is None and merge not in MERGES:
        raise TrainingError(f"unknown merge {merge!r}", hint=f"use one of {MERGES}")
    paths = source.expert_paths() if isinstance(source, Library) else resolve_expert_paths(source)
    clustering = cluster_experts(paths, k=k, embedding=embedding, seed=seed)
    ids = _member_ids(source, list(paths))
    cluster_tasks = _cluster_tasks(paths, clustering)
    first = json.loads((paths[clustering.names[0]] / "adapter_config.json").read_text())
    base_name = first.get("base_model_name_or_path") or "unknown"
    build = {
        "method": "mbc",
        "embedding": embedding,
        "k": clustering.k,
        "seed": seed,
        "experts": "trained" if data is not None else f"merged ({merge})",
        "source": f"{source.repo_id}@{source.commit}" if isinstance(source, Library) else None,
        "clusters": {c: [ids[n] for n in members] for c, members in clustering.clusters.items()},
        "tasks": cluster_tasks,
    }
    with tempfile.TemporaryDirectory(prefix="quiver-mbc-") as scratch_dir:
        scratch = Path(scratch_dir)
        if data is not None:
            training = dict(
                config=config, seed=seed, tokenizer=tokenizer, backend=backend, address=address,
                num_cpus=num_cpus,
            )  # fmt: skip
            base_model = base_model or base_name
            experts = _train_clusters(
                cluster_tasks, data, base_model, scratch, repo_id, registry, training
            )
            # The trained experts adapt the model as it was given (a Hub id or a folder).
            base_name = getattr(base_model, "name_or_path", None) or str(base_model)
        else:
            experts = _merge_clusters(paths, clustering, cluster_tasks, ids, first, scratch, merge)
        prototypes = save_prototypes(
            compute_arrow_prototypes({name: expert.path for name, expert in experts.items()}),
            scratch / f"{ARTIFACT_NAME}.safetensors",
        )
        return Library.create(
            registry,
            repo_id,
            base_model=base_name,
            description=description or _describe(build),
            build={key: value for key, value in build.items() if value is not None},
            experts=experts,
            artifacts={ARTIFACT_NAME: prototypes},
        )


def _merge_clusters(paths, clustering, cluster_tasks, ids, template, scratch, merge):
    stacked = load_experts(paths)
    rank = None  # svd and mu keep the members' rank
    if merge == "concat":  # every cluster padded to the largest one's rank: one rank per library
        largest = max(len(members) for members in clustering.clusters.values())
        rank = largest * max(max(stack.ranks) for stack in stacked.modules.values())
    return {
        cluster: write_merged_expert(
            scratch / cluster,
            stacked,
            members,
            template,
            method=merge,
            rank=rank,
            tasks=cluster_tasks[cluster],
            merged_from=[ids[n] for n in members],
        )
        for cluster, members in clustering.clusters.items()
    }


def _describe(build: dict[str, Any]) -> str:
    how = "trained on their tasks' data" if build["experts"] == "trained" else build["experts"]
    return (
        f"MBC library: {build['k']} cluster experts ({how}), clustered by the "
        f"{build['embedding']} embedding."
    )
