"""The ``quiver`` command: a thin layer over the Python API.

Each command parses its arguments, calls one API function and prints the result. Heavy modules are
imported inside the commands so that ``quiver --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from quiver import __version__
from quiver.errors import QuiverError

app = typer.Typer(
    name="quiver",
    help="Publish, pull and route libraries of LoRA experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        console.print(f"quiver {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_show_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """Publish, pull and route libraries of LoRA experts."""


hub_app = typer.Typer(
    help="A self-hosted, Hugging Face Hub-compatible registry.", no_args_is_help=True
)
hub_token_app = typer.Typer(help="Access tokens of a self-hosted Hub.", no_args_is_help=True)
hub_app.add_typer(hub_token_app, name="token")
app.add_typer(hub_app, name="hub")


@hub_app.command("serve")
def hub_serve(
    root: Path = typer.Option(..., "--root", help="Folder holding the registry's data."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to listen on."),
    latency_ms: float = typer.Option(0.0, help="Delay every request by this much (benchmarks)."),
    lfs_threshold: int | None = typer.Option(
        None, help="Ask for files of at least this many bytes via LFS (HF_HUB_DISABLE_XET=1)."
    ),
    max_body_bytes: int = typer.Option(1 << 30, help="Refuse bigger request bodies with 413."),
) -> None:
    """Serve a Hub that huggingface_hub clients reach through HF_ENDPOINT=http://HOST:PORT."""
    from quiver.registry.server import serve

    console.print(f"Serving {root} at http://{host}:{port} (HF_ENDPOINT=http://{host}:{port})")
    serve(
        root,
        host=host,
        port=port,
        latency_ms=latency_ms,
        lfs_threshold=lfs_threshold,
        max_body_bytes=max_body_bytes,
    )


@hub_token_app.command("create")
def hub_token_create(
    user: str = typer.Argument(..., help="User the token belongs to."),
    root: Path = typer.Option(..., "--root", help="Folder holding the registry's data."),
    write: bool = typer.Option(False, "--write", help="Allow writes to the user's namespaces."),
    org: list[str] = typer.Option([], "--org", help="Make the user a member of this org."),
) -> None:
    """Print a new access token for USER (use it as HF_TOKEN)."""
    from quiver.registry.server import HubStore

    print(HubStore(root).create_token(user, write=write, orgs=org))


@hub_token_app.command("revoke")
def hub_token_revoke(
    token: str = typer.Argument(..., help="The token to revoke."),
    root: Path = typer.Option(..., "--root", help="Folder holding the registry's data."),
) -> None:
    """Revoke an access token; the server refuses it from the next request on."""
    from quiver.registry.server import HubStore

    HubStore(root).revoke_token(token)
    console.print("Token revoked.")


REGISTRY_HELP = (
    "A folder path, an endpoint URL, or 'hf' for huggingface.co "
    "(default: the local store under $QUIVER_HOME)."
)
RegistryOption = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP)
TokenOption = typer.Option(
    None, "--token", envvar="HF_TOKEN", help="Access token for a Hub registry."
)


def _registry(spec: str | None, token: str | None):
    from quiver.registry import open_registry

    return open_registry(spec, token=token)


@app.command("push")
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
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Publish a LoRA expert with its model card."""
    from quiver.registry import Expert

    card = dict(tasks=task, datasets=dataset, license=license, description=description)
    card.update(examples=examples, steps=steps)
    expert = Expert.from_folder(folder, **{k: v for k, v in card.items() if v})
    target = _registry(registry, token)
    published = target.push(expert, repo_id, branch=branch, tag=tag)
    console.print(f"Pushed {repo_id}@{published.commit[:10]} to {target.location}")


@app.command("pull")
def pull(
    repo_id: str = typer.Argument(..., help="The expert to pull: namespace/name."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit (default: main)."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Download and verify an expert; print its local folder."""
    expert = _registry(registry, token).pull(repo_id, revision=revision)
    card = expert.card
    err_console.print(
        f"{repo_id}@{expert.commit[:10]}: LoRA r={card.rank} for {card.base_model}"
        + (f", tasks: {', '.join(card.tasks)}" if card.tasks else "")
    )
    print(expert.path)


@app.command("search")
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

    hits = _registry(registry, token).search(
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


library_app = typer.Typer(help="Named, pinned sets of experts for one base model.")
library_app.info.no_args_is_help = True
app.add_typer(library_app, name="library")


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


@library_app.command("create")
def library_create(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    base_model: str = typer.Option(..., help="The base model every expert adapts."),
    description: str = typer.Option("", help="One paragraph for the library card."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Create an empty library."""
    from quiver.registry import Library

    library = Library.create(
        _registry(registry, token), repo_id, base_model=base_model, description=description
    )
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

    library = Library.open(_registry(registry, token), repo_id)
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

    library = Library.open(_registry(registry, token), repo_id)
    library.remove(name)
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

    _show_library(Library.open(_registry(registry, token), repo_id, revision=revision))


@library_app.command("push")
def library_push(
    repo_id: str = typer.Argument(..., help="The library: namespace/name."),
    source: str | None = typer.Option(None, "--from", help=f"Where it is now. {REGISTRY_HELP}"),
    target_id: str | None = typer.Option(None, "--as", help="Publish under another name."),
    registry: str | None = RegistryOption,
    token: str | None = TokenOption,
) -> None:
    """Publish a library, its bundled and its referenced experts to --registry."""
    from quiver.registry import Library

    library = Library.open(_registry(source, token), repo_id)
    published = library.push(_registry(registry, token), target_id)
    console.print(
        f"Pushed {published.repo_id}@{published.commit[:10]} to {published.registry.location}"
    )


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
        _registry(registry, token), repo_id, revision=revision, max_workers=workers
    )
    err_console.print(f"{repo_id}@{library.commit[:10]}: {len(library.experts)} experts verified")
    for name, path in library.expert_paths().items():
        print(f"{name}\t{path}")


def main() -> None:
    """Run the app; a ``QuiverError`` becomes a one-line message and exit code 1."""
    try:
        app()
    except QuiverError as error:
        err_console.print(f"[bold red]error:[/] {error}")
        sys.exit(1)
