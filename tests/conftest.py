"""Test-wide environment. It must run before anything imports huggingface_hub, which freezes
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at import time."""

import os
import socket
import subprocess
import tempfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_SCRATCH = tempfile.mkdtemp(prefix="quiver-tests-")
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = os.path.join(_SCRATCH, "hf-home")
os.environ["QUIVER_HOME"] = os.path.join(_SCRATCH, "quiver-home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """The self-hosted Hub on 127.0.0.1:HUB_PORT, the HF_ENDPOINT every client here talks to.
    ``hub_server.create_token(user, write=True, orgs=())`` makes access tokens."""
    from quiver.server import HubServer

    with HubServer(tmp_path_factory.mktemp("hub-root"), port=HUB_PORT) as server:
        yield server


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a tmpfs of ``size`` ("3m") under tmp_path, a real disk that fills up.
    Mounting needs the right to; without it the test is skipped."""
    mounts = []

    def mount(size: str):
        path = tmp_path / f"disk-{len(mounts)}"
        path.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        mounted = subprocess.run(command, capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=True)
