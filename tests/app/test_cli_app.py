"""``quiver app``: serves the app on the embedded default and says where."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from gradio_client import Client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a second Python that imports torch and Gradio: ~10 s on a quiet machine
def test_quiver_app_serves_the_demo_and_prints_its_url(local_registry):
    port = _free_port()
    command = [sys.executable, "-c", "from quiver.cli import main; main()", "app"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"Quiver app running on (\S+)", process.stdout.readline())
            url = found and found.group(1)
        assert url == f"http://127.0.0.1:{port}/"
        assert "Quiver" in httpx.get(url, timeout=30).text
        client = Client(url, verbose=False)
        text, routing = client.predict("Hi", "base", max_new_tokens=4, api_name="/chat")
        assert isinstance(text, str) and 1 <= len(routing["tokens"]) <= 4
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
