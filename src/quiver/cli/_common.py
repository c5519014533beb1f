"""What every command shares: the consoles, the registry and token options."""

from __future__ import annotations

import logging
import warnings

import typer
from rich.console import Console

console = Console(soft_wrap=True)  # a line a script reads is never wrapped
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long

REGISTRY_HELP = (
    "A folder path, an endpoint URL, or 'hf' for huggingface.co "
    "(default: the local store under $QUIVER_HOME)."
)
RegistryOption = typer.Option(None, "--registry", "-r", help=REGISTRY_HELP)
TokenOption = typer.Option(
    None, "--token", envvar="HF_TOKEN", help="Access token for a Hub registry."
)


def registry_from(spec: str | None, token: str | None, *, create: bool = False):
    """The registry ``-r`` names. Only commands that publish pass ``create=True``: a mistyped
    folder given to any other command is an error, not a new, empty store. huggingface_hub's own
    warnings (each retry of an unreachable endpoint, a nearly full disk) are silenced: the
    command ends with one line saying what failed."""
    from quiver.registry import open_registry

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="huggingface_hub")
    return open_registry(spec, token=token, create=create)
