"""The ``quiver`` command: a thin layer over the Python API.

Each command parses its arguments, calls one API function and prints the result. Heavy modules are
imported inside the commands so that ``quiver --help`` stays fast.
"""

from __future__ import annotations

import typer
from rich.text import Text
from typer.core import TyperGroup

from quiver import __version__
from quiver.cli import app as app_command
from quiver.cli import hub, library, registry, toyworld, training
from quiver.cli._common import console, err_console
from quiver.errors import QuiverError


class _OneLineErrors(TyperGroup):
    """Every expected failure (a ``QuiverError``, or the system refusing a file operation) ends
    as one line on stderr and exit code 1, whether run as ``quiver`` or in a ``CliRunner``."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (QuiverError, OSError) as error:
            message = str(error) if isinstance(error, QuiverError) else _os_error_line(error)
            message = " ".join(message.split())  # one line, whatever the message embeds
            err_console.print(Text.assemble(("error: ", "bold red"), message))
            raise typer.Exit(1) from error


def _os_error_line(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    return f"{error.strerror or error}{where}"


app = typer.Typer(
    name="quiver",
    cls=_OneLineErrors,
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
app.add_typer(training.commands)  # also adds `library cluster`, `build-mbc` and `build-elrea`
app.add_typer(library.library_app, name="library")
app.add_typer(hub.hub_app, name="hub")
app.add_typer(app_command.commands)
app.add_typer(toyworld.toyworld_app, name="toyworld")


def main() -> None:
    """Run the app (the ``quiver`` console script)."""
    app()
