"""The ``quiver`` command: a thin layer over the Python API.

Each command parses its arguments, calls one API function and prints the result. Heavy modules are
imported inside the commands so that ``quiver --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from quiver import __version__
from quiver.cli import hub, library, registry, toyworld
from quiver.cli._common import console, err_console
from quiver.errors import QuiverError

app = typer.Typer(
    name="quiver",
    help="Publish, pull and route libraries of LoRA experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


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


app.add_typer(registry.commands)
app.add_typer(library.library_app, name="library")
app.add_typer(hub.hub_app, name="hub")
app.add_typer(toyworld.toyworld_app, name="toyworld")


def main() -> None:
    """Run the app; a ``QuiverError`` becomes a one-line message and exit code 1."""
    try:
        app()
    except QuiverError as error:
        err_console.print(f"[bold red]error:[/] {error}")
        sys.exit(1)
