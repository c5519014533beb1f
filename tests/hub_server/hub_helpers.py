"""Helpers shared by the Hub server tests."""

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

QUIVER = str(Path(sys.executable).with_name("quiver"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(root: Path, *options: str, quiver: tuple[str, ...] = (QUIVER,)):
    """``quiver hub serve`` in a subprocess; yields (process, endpoint) once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [*quiver, "hub", "serve", "--root", str(root), "--port", str(port), *options],
        stdout=subprocess.PIPE,  # one line: where it serves
        stderr=subprocess.PIPE,
        text=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{endpoint}/api/models", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        yield process, endpoint
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()
