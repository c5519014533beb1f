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
) -> None:
    """Serve a Hub that huggingface_hub clients reach through HF_ENDPOINT=http://HOST:PORT."""
    from quiver.registry.server import serve

    console.print(f"Serving {root} at http://{host}:{port} (HF_ENDPOINT=http://{host}:{port})")
    serve(root, host=host, port=port, latency_ms=latency_ms, lfs_threshold=lfs_threshold)


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


def main() -> None:
    """Run the app; a ``QuiverError`` becomes a one-line message and exit code 1."""
    try:
        app()
    except QuiverError as error:
        err_console.print(f"[bold red]error:[/] {error}")
        sys.exit(1)
