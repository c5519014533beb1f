"""``quiver hub``: serve a self-hosted, Hub-compatible registry and manage its tokens."""

from __future__ import annotations

from pathlib import Path

import typer

from quiver.cli._common import console

hub_app = typer.Typer(
    help="A self-hosted, Hugging Face Hub-compatible registry.", no_args_is_help=True
)
hub_token_app = typer.Typer(help="Access tokens of a self-hosted Hub.", no_args_is_help=True)
hub_app.add_typer(hub_token_app, name="token")


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
    from quiver.server import serve

    def announce(endpoint: str) -> None:
        console.print(f"Serving {root} at {endpoint} (HF_ENDPOINT={endpoint})")

    serve(
        root,
        host=host,
        port=port,
        latency_ms=latency_ms,
        lfs_threshold=lfs_threshold,
        max_body_bytes=max_body_bytes,
        ready=announce,
    )


@hub_token_app.command("create")
def hub_token_create(
    user: str = typer.Argument(..., help="User the token belongs to."),
    root: Path = typer.Option(..., "--root", help="Folder holding the registry's data."),
    write: bool = typer.Option(False, "--write", help="Allow writes to the user's namespaces."),
    org: list[str] = typer.Option([], "--org", help="Make the user a member of this org."),
) -> None:
    """Print a new access token for USER (use it as HF_TOKEN)."""
    from quiver.server import HubStore

    print(HubStore(root).create_token(user, write=write, orgs=org))


@hub_token_app.command("revoke")
def hub_token_revoke(
    token: str = typer.Argument(..., help="The token to revoke."),
    root: Path = typer.Option(..., "--root", help="Folder holding the registry's data."),
) -> None:
    """Revoke an access token; the server refuses it from the next request on."""
    from quiver.server import HubStore

    HubStore(root).revoke_token(token)
    console.print("Token revoked.")


@hub_app.command("gc")
def hub_gc(
    root: Path = typer.Option(..., "--root", help="Folder holding the registry's data."),
    delete: bool = typer.Option(False, "--delete", help="Remove them (default: only list them)."),
    min_age: float = typer.Option(
        3600.0, "--min-age", help="Spare blobs written or wanted less than this many seconds ago."
    ),
) -> None:
    """Find blobs no commit references and snapshot folders of deleted commits; with --delete,
    remove them. Safe while `quiver hub serve` or a push writes to the same folder."""
    from quiver.store import RepoStore, delete_garbage, find_garbage

    store = RepoStore(root)
    garbage = find_garbage(store, min_age_s=min_age)
    if delete:
        with console.status("Waiting for the writes in flight, then deleting..."):
            garbage = delete_garbage(store, garbage)
    what = (
        f"{len(garbage.blobs)} unreferenced blobs ({garbage.blob_bytes / 2**20:.1f} MiB) and "
        f"{len(garbage.snapshots)} snapshot folders of deleted commits"
    )
    if garbage.deleted:
        console.print(f"Removed {what}.")
    else:
        console.print(f"Found {what}; pass --delete to remove them.")
