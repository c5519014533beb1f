"""``quiver app``: the Gradio app, on the embedded demo library or on any registry's library."""

from __future__ import annotations

import typer

from quiver.cli._common import RegistryOption, TokenOption, console

commands = typer.Typer()


@commands.command("app")
def app(
    registry: str | None = RegistryOption,
    library: str | None = typer.Option(
        None, "--library", "-l", help="Chat with this library (default: the built-in demo)."
    ),
    token: str | None = TokenOption,
    host: str = typer.Option("127.0.0.1", help="Address to serve on (0.0.0.0: every interface)."),
    port: int | None = typer.Option(None, help="Port (default: 7860, or the next free one)."),
    share: bool = typer.Option(False, "--share", help="Also serve on a public gradio.live link."),
    threads: int | None = typer.Option(
        None, min=1, help="Torch threads of the chat's model (default: torch's; 1 for the demo)."
    ),
) -> None:
    """Browse a registry, compose a library, chat with the routed model and see the routing."""
    from quiver.app import open_engine, serve

    engine = open_engine(registry, library, token=token, own_process=True, threads=threads)
    served = serve(registry, token=token, host=host, port=port, share=share, engine=engine)
    console.print(f"Quiver app running on {served.local_url}")
    if served.share_url:
        console.print(f"Public link: {served.share_url}")
    console.print("Press Ctrl+C to stop.")
    served.block_thread()
