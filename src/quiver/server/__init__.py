"""A self-hosted, Hugging Face Hub-compatible registry: point ``HF_ENDPOINT`` at it and the
unmodified ``huggingface_hub`` client (and PEFT, transformers, Gradio through it) works against it.

``serve()`` runs it in the foreground (``quiver hub serve``); ``HubServer`` runs it in a background
thread, for tests and benchmarks::

    with HubServer("/tmp/hub", port=0) as hub:
        token = hub.create_token("alice", write=True)
        HfApi(endpoint=hub.endpoint, token=token).create_repo("alice/expert")
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from quiver.errors import ConnectionFailedError
from quiver.server.accounts import HubStore
from quiver.server.app import create_app
from quiver.server.options import HubOptions

__all__ = ["HubOptions", "HubServer", "HubStore", "create_app", "serve"]


def _uvicorn_config(store: HubStore, host: str, port: int, options: HubOptions):
    import uvicorn

    return uvicorn.Config(
        create_app(store, options), host=host, port=port, log_level="warning", lifespan="off"
    )


def serve(
    root: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    latency_ms: float = 0.0,
    max_body_bytes: int = HubOptions.max_body_bytes,
    lfs_threshold: int | None = None,
) -> None:
    """Serve the registry stored under ``root`` until interrupted."""
    import uvicorn

    options = HubOptions(
        latency_ms=latency_ms, max_body_bytes=max_body_bytes, lfs_threshold=lfs_threshold
    )
    uvicorn.Server(_uvicorn_config(HubStore(root), host, port, options)).run()


class HubServer:
    """The registry in a background thread on ``host:port`` (``port=0`` picks a free one)."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        max_body_bytes: int = HubOptions.max_body_bytes,
        page_size: int = HubOptions.page_size,
        lfs_threshold: int | None = None,
    ) -> None:
        import uvicorn

        self.root = Path(root)
        self.store = HubStore(self.root)
        options = HubOptions(
            latency_ms=latency_ms,
            max_body_bytes=max_body_bytes,
            page_size=page_size,
            lfs_threshold=lfs_threshold,
        )
        self._server = uvicorn.Server(_uvicorn_config(self.store, host, port, options))
        self._thread = threading.Thread(target=self._server.run, name="quiver-hub", daemon=True)
        self.host = host
        self.port = port

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def create_token(self, user: str, *, write: bool = True, orgs: tuple[str, ...] = ()) -> str:
        """A new access token for ``user`` (a member of ``orgs``)."""
        return self.store.create_token(user, write=write, orgs=orgs)

    def start(self, *, timeout_s: float = 30.0) -> HubServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConnectionFailedError(
                    f"the hub server did not start on {self.host}:{self.port}",
                    hint="is the port already in use?",
                )
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
