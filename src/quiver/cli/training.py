"""``quiver train``, ``quiver library cluster``, ``build-mbc``, ``build-elrea``: make libraries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from quiver.cli._common import (
    REGISTRY_HELP,
    RegistryOption,
    TokenOption,
    console,
    err_console,
    registry_from,
)
from quiver.cli.library import library_app
from quiver.errors import TrainingError

commands = typer.Typer()

# Training settings shared by `train` and `library build-mbc` (defaults: TrainConfig's).
Rank = Annotated[int, typer.Option(help="LoRA rank.")]
Alpha = Annotated[float, typer.Option(help="LoRA alpha.")]
LearningRate = Annotated[float, typer.Option(help="Peak learning rate.")]
Epochs = Annotated[float, typer.Option(help="Passes over the data.")]
MaxSteps = Annotated[int | None, typer.Option(help="Stop after this many steps (over epochs).")]
BatchSize = Annotated[int, typer.Option(help="Examples per step.")]
Seed = Annotated[int, typer.Option(help="Seed of the data order (and of k-means).")]
InitSeed = Annotated[int, typer.Option(help="Seed of the LoRA init, shared by a library.")]
Progress = Annotated[
    bool | None, typer.Option("--progress/--no-progress", help="Progress bars (default: on a TTY).")
]


def _config(rank, alpha, learning_rate, epochs, max_steps, batch_size, init_seed):
    from quiver.training import TrainConfig

    return TrainConfig(
        rank=rank,
        alpha=alpha,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        init_seed=init_seed,
    )


@commands.command("train")
def train(
    data: Path = typer.Argument(..., help="A JSONL file, or a folder saved by `datasets`."),
    base_model: str = typer.Option(..., help="Hub id or local folder of the base model."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the expert to."),
    task: str | None = typer.Option(None, help="Task name (default: the file's name)."),
    eval_data: Path | None = typer.Option(None, help="Held-out examples for eval metrics."),
    push: str | None = typer.Option(None, help="Publish the expert as this namespace/name."),
    rank: Rank = 4,
    alpha: Alpha = 16.0,
    learning_rate: LearningRate = 1e-4,
    epochs: Epochs = 1.0,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    init_seed: InitSeed = 0,
    progress: Progress = None,
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Train one LoRA expert on DATA (prompt/response pairs or chat messages)."""
    from quiver.training import train_expert

    config = _config(rank, alpha, learning_rate, epochs, max_steps, batch_size, init_seed)
    target = None
    if push:  # a bad name or a dead registry fails now, not after the training
        target = registry_from(registry, token, create=True)
        target.check_can_push(push)
    expert = train_expert(
        base_model,
        data,
        task=task,
        config=config,
        seed=seed,
        eval_data=eval_data,
        output_dir=output,
        progress=progress,
    )
    card = expert.card
    metrics = ", ".join(f"eval {r.metric_type} {r.metric_value:.4f}" for r in card.eval_results)
    err_console.print(
        f"Trained {', '.join(card.tasks)}: {card.examples} examples, {card.steps} steps, "
        f"final loss {card.train_loss:.4f}" + (f", {metrics}" if metrics else "")
    )
    if target is not None:
        published = target.push(expert, push)
        err_console.print(f"Pushed {push}@{published.commit[:10]} to {target.location}")
    print(expert.path)


def _member_ids(library) -> dict[str, str]:
    return {p.name: p.repo_id or f"{library.repo_id}/{p.subfolder}" for p in library.experts}


@library_app.command("cluster")
def library_cluster(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    method: str = typer.Option("mbc", help="Clustering method (mbc)."),
    embedding: str = typer.Option(
        "update", help="'update' (any experts) or 'parameters' (one shared LoRA init only)."
    ),
    k: int | None = typer.Option(None, "--k", help="Number of clusters (default: suggested)."),
    seed: Seed = 0,
    as_json: bool = typer.Option(False, "--json", help="Print cluster -> expert repo ids."),
    plot: Path | None = typer.Option(None, help="Write the similarity heat-map PNG here."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit (default: main)."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Cluster a library's experts by their weights (MBC)."""
    from quiver.registry import Library
    from quiver.training import cluster_experts

    if method != "mbc":
        raise TrainingError(f"unknown clustering method {method!r}", hint="use --method mbc")
    library = Library.pull(registry_from(registry, token), repo_id, revision=revision)
    clustering = cluster_experts(library, k=k, embedding=embedding, seed=seed)
    ids = _member_ids(library)
    clusters = {c: [ids[n] for n in names] for c, names in clustering.clusters.items()}
    if plot is not None:
        clustering.plot(plot, title=f"{repo_id}: MBC ({embedding}), k={clustering.k}")
        err_console.print(f"Heat-map written to {plot}")
    if as_json:
        print(json.dumps(clusters, indent=2))
        return
    from rich.table import Table

    table = Table("cluster", "experts", title=f"{repo_id}: k={clustering.k} ({embedding})")
    for cluster, members in clusters.items():
        table.add_row(cluster, ", ".join(members))
    console.print(table)


def _parse_data(specs: list[str]) -> dict[str, str]:
    data = {}
    for spec in specs:
        task, sep, path = spec.partition("=")
        if not sep or not task or not path:
            raise TrainingError(
                f"--data {spec!r} is not TASK=FILE", hint="e.g. --data math=m.jsonl"
            )
        if task in data:  # the last one silently won
            raise TrainingError(
                f"--data names the task {task!r} twice ({data[task]} and {path})",
                hint="give each task one file",
            )
        data[task] = path
    return data


@library_app.command("build-mbc")
def library_build_mbc(
    repo_id: str = typer.Argument(..., help="The library to cluster: namespace/name."),
    new_repo_id: str = typer.Argument(..., help="The library to create: namespace/name."),
    k: int = typer.Option(..., "--k", help="Number of clusters, i.e. of new experts."),
    embedding: str = typer.Option("update", help="'update' or 'parameters' (see cluster)."),
    data: list[str] = typer.Option(
        [], "--data", help="TASK=FILE: train each cluster on its tasks' data (else: merge)."
    ),
    merge: str = typer.Option("svd", help="Without data: 'svd', 'concat' or 'mu'."),
    base_model: str | None = typer.Option(
        None, help="Train from this model (default: the experts')."
    ),
    backend: str = typer.Option("local", help="'local' or 'ray'."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: a local Ray)."),
    rank: Rank = 4,
    alpha: Alpha = 16.0,
    learning_rate: LearningRate = 1e-4,
    epochs: Epochs = 1.0,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    init_seed: InitSeed = 0,
    source: str | None = typer.Option(
        None, "--from", help=f"Where LIBRARY is (default: --registry). {REGISTRY_HELP}"
    ),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Cluster LIBRARY with MBC and publish NEW_LIBRARY, one expert per cluster."""
    from quiver.registry import Library
    from quiver.training import build_mbc_library

    target = registry_from(registry, token, create=True)
    library = Library.pull(registry_from(source, token) if source else target, repo_id)
    config = _config(rank, alpha, learning_rate, epochs, max_steps, batch_size, init_seed)
    built = build_mbc_library(
        library,
        target,
        new_repo_id,
        k=k,
        embedding=embedding,
        seed=seed,
        data=_parse_data(data) if data else None,
        base_model=base_model,
        config=config,
        backend=backend,
        address=address,
        merge=merge,
    )
    how = built.manifest.build["experts"]
    clusters = built.manifest.build["clusters"]
    _show_built(
        built,
        target,
        f"{len(built.experts)} cluster experts ({how}), Arrow prototypes attached",
        {cluster: ", ".join(members) for cluster, members in clusters.items()},
    )


def _show_built(library, target, summary: str, clusters: dict[str, str]) -> None:
    """What a build published, and a line per cluster."""
    console.print(f"Built {library.repo_id}@{library.commit[:10]} in {target.location}: {summary}")
    for cluster, line in clusters.items():
        console.print(f"  {cluster}: {line}")


@library_app.command("build-elrea")
def library_build_elrea(
    data: Path = typer.Argument(..., help="A JSONL file, or a folder saved by `datasets`."),
    new_repo_id: str = typer.Argument(..., help="The library to create: namespace/name."),
    base_model: str = typer.Option(..., help="Hub id or local folder of the base model."),
    k: int = typer.Option(..., "--k", help="Number of gradient clusters, i.e. of experts."),
    backend: str = typer.Option("local", help="'local' or 'ray'."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: a local Ray)."),
    num_cpus: int | None = typer.Option(None, help="CPUs of a local Ray (default: all)."),
    clustering: str = typer.Option("birch", help="'birch' (the paper's) or 'kmeans'."),
    fit_examples: int = typer.Option(5000, help="Examples the clustering is fitted on."),
    threshold: float = typer.Option(0.3, help="BIRCH's subcluster radius (unit features)."),
    projection_dim: int = typer.Option(8192, help="Dimension of the gradient features."),
    projection_seed: int = typer.Option(0, help="Seed of the gradient projection."),
    rank: Rank = 4,
    alpha: Alpha = 16.0,
    learning_rate: LearningRate = 1e-4,
    epochs: Epochs = 1.0,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    init_seed: InitSeed = 0,
    description: str = typer.Option("", help="One paragraph for the library card."),
    progress: Progress = None,
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Train a base LoRA on DATA, cluster the examples by their gradients, train one expert per
    cluster from the base adapter, and publish them as NEW_LIBRARY (route it with 'elrea')."""
    from quiver.training import build_elrea_library

    target = registry_from(registry, token, create=True)
    library = build_elrea_library(
        data,
        target,
        new_repo_id,
        base_model=base_model,
        k=k,
        config=_config(rank, alpha, learning_rate, epochs, max_steps, batch_size, init_seed),
        clustering=clustering,
        fit_examples=fit_examples,
        threshold=threshold,
        projection_dim=projection_dim,
        projection_seed=projection_seed,
        seed=seed,
        backend=backend,
        address=address,
        num_cpus=num_cpus,
        description=description,
        progress=progress,
    )
    sizes = library.manifest.build["cluster_sizes"]
    _show_built(
        library,
        target,
        f"a base adapter and {len(sizes)} experts, elrea artifact attached",
        {cluster: f"{size} examples" for cluster, size in sizes.items()},
    )
