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
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from quiver.errors import ConnectionFailedError, InvalidInputError
from quiver.server.accounts import HubStore
from quiver.server.app import create_app
from quiver.server.options import HubOptions

__all__ = ["HubOptions", "HubServer", "HubStore", "create_app", "listen", "serve"]


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (``port=0``: any free port), or a one-line error saying
    why it cannot be."""
    if not 0 <= port <= 65535:
        raise InvalidInputError(f"port {port} is out of range", hint="use 1-65535, or 0 for any")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise InvalidInputError(
            f"cannot listen on {host!r}: {error}", hint="check --host"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise InvalidInputError(
            f"cannot listen on {host}:{port}: {error.strerror or error}",
            hint="pick another --port, or stop what is listening there",
        ) from None
    return sock


def _uvicorn_server(store: HubStore, options: HubOptions):
    import uvicorn

    app = create_app(store, options)
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))


def serve(
    root: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    latency_ms: float = 0.0,
    max_body_bytes: int = HubOptions.max_body_bytes,
    lfs_threshold: int | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the registry stored under ``root`` until interrupted; ``ready(endpoint)`` is called
    once the port is bound."""
    options = HubOptions(
        latency_ms=latency_ms, max_body_bytes=max_body_bytes, lfs_threshold=lfs_threshold
    )
    server = _uvicorn_server(HubStore(root), options)
    sock = listen(host, port)
    if ready is not None:
        ready(f"http://{host}:{sock.getsockname()[1]}")
    server.run(sockets=[sock])


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
        self.root = Path(root)
        self.store = HubStore(self.root)
        options = HubOptions(
            latency_ms=latency_ms,
            max_body_bytes=max_body_bytes,
            page_size=page_size,
            lfs_threshold=lfs_threshold,
        )
        self._server = _uvicorn_server(self.store, options)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def create_token(self, user: str, *, write: bool = True, orgs: tuple[str, ...] = ()) -> str:
        """A new access token for ``user`` (a member of ``orgs``)."""
        return self.store.create_token(user, write=write, orgs=orgs)

    def start(self, *, timeout_s: float = 30.0) -> HubServer:
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="quiver-hub", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConnectionFailedError(f"the hub server did not start on {self.endpoint}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
