"""``quiver library build-elrea``: an ELREA library from training data."""

from __future__ import annotations

from pathlib import Path

import typer

from quiver.cli._common import RegistryOption, TokenOption, console, registry_from
from quiver.cli.library import library_app


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
    rank: int = typer.Option(4, help="LoRA rank."),
    alpha: float = typer.Option(16.0, help="LoRA alpha."),
    learning_rate: float = typer.Option(1e-4, help="Peak learning rate."),
    epochs: float = typer.Option(1.0, help="Passes over the data (base adapter and experts)."),
    max_steps: int | None = typer.Option(None, help="Stop each training after this many steps."),
    batch_size: int = typer.Option(8, help="Examples per step."),
    seed: int = typer.Option(0, help="Seed of the data order and the clustering."),
    description: str = typer.Option("", help="One paragraph for the library card."),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars (default: on a TTY)."
    ),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Train a base LoRA on DATA, cluster the examples by their gradients, train one expert per
    cluster from the base adapter, and publish them as NEW_LIBRARY (route it with 'elrea')."""
    from quiver.training import TrainConfig, build_elrea_library

    config = TrainConfig(
        rank=rank,
        alpha=alpha,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
    )
    target = registry_from(registry, token, create=True)
    library = build_elrea_library(
        data,
        target,
        new_repo_id,
        base_model=base_model,
        k=k,
        config=config,
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
    console.print(
        f"Built {library.repo_id}@{library.commit[:10]} in {target.location}: a base adapter "
        f"and {len(sizes)} experts, elrea artifact attached"
    )
    for cluster, size in sizes.items():
        console.print(f"  {cluster}: {size} examples")
