"""``quiver push | pull | search``: experts in any registry."""

from __future__ import annotations

from pathlib import Path

import typer

from quiver.cli._common import (
    RegistryOption,
    TokenOption,
    console,
    err_console,
    registry_from,
)

commands = typer.Typer()


@commands.command("push")
def push(
    folder: Path = typer.Argument(..., help="A PEFT LoRA folder (adapter_config.json, weights)."),
    repo_id: str = typer.Argument(..., help="Where to publish it: namespace/name."),
    task: list[str] = typer.Option([], "--task", help="A task the expert was trained on."),
    dataset: list[str] = typer.Option([], "--dataset", help="A dataset it was trained on."),
    license: str | None = typer.Option(None, help="License id, e.g. apache-2.0."),
    examples: int | None = typer.Option(None, help="Number of training examples."),
    steps: int | None = typer.Option(None, help="Number of training steps."),
    description: str = typer.Option("", help="One paragraph for the model card."),
    branch: str = typer.Option("main", help="Branch to commit to."),
    tag: str | None = typer.Option(None, help="Tag the new version."),
    replace: bool = typer.Option(
        False, help="Delete the repo's files that a push does not write (kept by default)."
    ),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Publish a LoRA expert with its model card (onto a new repo or an expert's, never over a
    model or a library)."""
    from quiver.registry import Expert

    card = dict(tasks=task, datasets=dataset, license=license, description=description)
    card.update(examples=examples, steps=steps)
    expert = Expert.from_folder(folder, **{k: v for k, v in card.items() if v})
    target = registry_from(registry, token, create=True)
    published = target.push(expert, repo_id, branch=branch, tag=tag, replace=replace)
    console.print(f"Pushed {repo_id}@{published.commit[:10]} to {target.location}")


@commands.command("pull")
def pull(
    repo_id: str = typer.Argument(..., help="The expert to pull: namespace/name."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit (default: main)."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Download and verify an expert; print its local folder."""
    expert = registry_from(registry, token).pull(repo_id, revision=revision)
    card = expert.card
    err_console.print(
        f"{repo_id}@{expert.commit[:10]}: LoRA r={card.rank} for {card.base_model}"
        + (f", tasks: {', '.join(card.tasks)}" if card.tasks else "")
    )
    print(expert.path)


@commands.command("search")
def search(
    query: str | None = typer.Argument(None, help="Free text (the Hub matches repo ids)."),
    base_model: str | None = typer.Option(None, help="Only experts for this base model."),
    task: str | None = typer.Option(None, help="Only experts trained on this task."),
    tag: str | None = typer.Option(None, help="Only repos with this tag."),
    author: str | None = typer.Option(None, help="Only repos of this user or org."),
    kind: str | None = typer.Option(None, help="'expert' or 'library'."),
    limit: int = typer.Option(50, help="At most this many results."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Find experts and libraries."""
    from rich.table import Table

    hits = registry_from(registry, token).search(
        base_model=base_model,
        task=task,
        tag=tag,
        author=author,
        query=query,
        kind=kind,
        limit=limit,
    )
    table = Table("repo", "kind", "base model", "tasks")
    for hit in hits:
        table.add_row(hit.repo_id, hit.kind, hit.base_model or "", ", ".join(hit.tasks))
    console.print(table if hits else "No match.")
