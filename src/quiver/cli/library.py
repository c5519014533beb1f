"""``quiver library ...``: named, pinned sets of experts for one base model."""

from __future__ import annotations

import json

import typer

from quiver.cli._common import (
    REGISTRY_HELP,
    RegistryOption,
    TokenOption,
    console,
    err_console,
    registry_from,
)

library_app = typer.Typer(help="Named, pinned sets of experts for one base model.")
library_app.info.no_args_is_help = True


def _show_library(library) -> None:
    from rich.table import Table

    table = Table("expert", "source", "sha256", title=f"{library.repo_id}@{library.commit[:10]}")
    for pin in library.experts:
        source = "bundled" if pin.bundled else f"{pin.repo_id}@{pin.commit[:10]}"
        table.add_row(pin.name, source, pin.sha256[:16])
    console.print(table)
    manifest = library.manifest
    console.print(f"base model: {manifest.base_model}, rank: {manifest.rank}")
    if manifest.artifacts:
        console.print(f"artifacts: {', '.join(manifest.artifacts)}")
    if manifest.routing:
        console.print(f"routing advice: {json.dumps(manifest.routing)}")


@library_app.command("create")
def library_create(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    base_model: str = typer.Option(..., help="The base model every expert adapts."),
    description: str = typer.Option("", help="One paragraph for the library card."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Create an empty library."""
    from quiver.errors import AlreadyExistsError
    from quiver.registry import Library

    try:
        library = Library.create(
            registry_from(registry, token, create=True),
            repo_id,
            base_model=base_model,
            description=description,
        )
    except AlreadyExistsError as error:
        raise AlreadyExistsError(
            error.message,
            hint=f"change it with `quiver library add|remove {repo_id} ...`, or pick another name",
            repo_id=repo_id,
        ) from error
    console.print(f"Created {library.repo_id}@{library.commit[:10]}")


@library_app.command("add")
def library_add(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    expert: str = typer.Argument(..., help="A PEFT folder (bundled) or namespace/name[@rev]."),
    name: str | None = typer.Option(None, help="Name in the library (default: the repo's)."),
    bundle: bool = typer.Option(False, help="Copy a published expert into the library repo."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Add an expert; commits a new version of the library."""
    from quiver.registry import Library

    library = Library.open(registry_from(registry, token), repo_id)
    library.add(expert, name=name, bundle=bundle)
    _show_library(library)


@library_app.command("remove")
def library_remove(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    name: str = typer.Argument(..., help="The expert to remove."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Remove an expert; commits a new version of the library."""
    from quiver.registry import Library

    library = Library.open(registry_from(registry, token), repo_id)
    library.remove(name)
    _show_library(library)


@library_app.command("set-routing")
def library_set_routing(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    advice: str = typer.Argument(
        ...,
        help='Strategy -> options, as JSON: \'{"arrow": {"granularity": "sequence", '
        '"prompt_layers": [0]}}\'; null removes the advice.',
    ),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Record how the library is best routed (tools such as the app start from it); commits a
    new version of the library."""
    from quiver.errors import InvalidInputError
    from quiver.registry import Library

    try:
        routing = json.loads(advice)
    except json.JSONDecodeError as error:
        raise InvalidInputError(
            f"the routing advice is not JSON: {error}",
            hint='e.g. \'{"arrow": {"granularity": "sequence", "prompt_layers": [0]}}\'',
        ) from error
    library = Library.open(registry_from(registry, token), repo_id)
    library.set_routing(routing)
    _show_library(library)


@library_app.command("show")
def library_show(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit (default: main)."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """List a library's pinned experts and artifacts."""
    from quiver.registry import Library

    _show_library(Library.open(registry_from(registry, token), repo_id, revision=revision))


@library_app.command("push")
def library_push(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    source: str | None = typer.Option(None, "--from", help=f"Where it is now. {REGISTRY_HELP}"),
    target_id: str | None = typer.Option(None, "--as", help="Publish under another name."),
    overwrite: bool = typer.Option(
        False, help="Move the main of expert repos on the target that hold other weights."
    ),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Publish a library from --from, its bundled and its referenced experts, to --registry."""
    from quiver.errors import NotFoundError
    from quiver.registry import Library

    try:
        library = Library.open(registry_from(source, token), repo_id)
    except NotFoundError as error:
        raise NotFoundError(
            error.message,
            hint="pass --from with the registry that holds the library (default: the local "
            "store); --registry is where it goes",
            repo_id=repo_id,
        ) from error
    report = library.push(
        registry_from(registry, token, create=True), target_id, overwrite=overwrite
    )
    published = report.library
    console.print(
        f"Pushed {published.repo_id}@{published.commit[:10]} to {published.registry.location}"
    )
    for label, repos in (
        ("experts pushed", report.pushed),
        ("already there", report.already_there),
        (
            "overwritten (their main held sha256)",
            [f"{r} {s[:16]}…" for r, s in report.overwritten.items()],
        ),
        ("artifacts replaced", report.replaced_artifacts),
    ):
        if repos:
            console.print(f"  {label}: {', '.join(repos)}")


@library_app.command("pull")
def library_pull(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit (default: main)."),
    workers: int = typer.Option(16, help="Concurrent downloads."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Download a library's experts concurrently and verify every hash; print their folders."""
    from quiver.registry import Library

    library = Library.pull(
        registry_from(registry, token), repo_id, revision=revision, max_workers=workers
    )
    err_console.print(f"{repo_id}@{library.commit[:10]}: {len(library.experts)} experts verified")
    for name, path in library.expert_paths().items():
        print(f"{name}\t{path}")
