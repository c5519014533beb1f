"""The registry commands of the ``quiver`` CLI, over a local store and the self-hosted Hub."""

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from quiver.cli import app
from quiver.registry import HubRegistry, Library, LocalRegistry

BASE = "quiver-testing/tiny-llama"


def quiver(*args: str) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def quiver_error(*args: str) -> str:
    """Run a command that must fail; return its one line of error, as the user sees it."""
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def test_push_search_pull_with_a_folder_registry(tmp_path, make_expert):
    store = tmp_path / "store"
    folder = make_expert()
    out = quiver("push", folder, "alice/math", "--task", "math", "--steps", "10", "-r", store)
    assert "Pushed alice/math@" in out
    assert "alice/math" in quiver("search", "--task", "math", "-r", store)
    assert "No match." in quiver("search", "--task", "code", "-r", store)
    path = Path(quiver("pull", "alice/math", "-r", store).strip().splitlines()[-1])
    assert (path / "adapter_model.safetensors").read_bytes() == (
        folder / "adapter_model.safetensors"
    ).read_bytes()
    assert LocalRegistry(store).pull("alice/math").card.steps == 10


def test_library_commands_from_local_store_to_hub(hub_server, tmp_path, make_expert):
    store = tmp_path / "store"
    quiver("push", make_expert("math"), "clitester/math", "-r", store)
    quiver("library", "create", "clitester/lib", "--base-model", BASE, "-r", store)
    quiver("library", "add", "clitester/lib", "clitester/math", "-r", store)
    quiver("library", "add", "clitester/lib", make_expert("code"), "-r", store)
    quiver("library", "add", "clitester/lib", make_expert("extra"), "-r", store)
    shown = quiver("library", "remove", "clitester/lib", "extra", "-r", store)
    assert "code" in shown and "extra" not in shown
    assert "bundled" in quiver("library", "show", "clitester/lib", "-r", store)

    token = hub_server.create_token("clitester")
    endpoint = hub_server.endpoint
    quiver("library", "push", "clitester/lib", "--from", store, "-r", endpoint, "--token", token)
    lines = quiver("library", "pull", "clitester/lib", "-r", endpoint).strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["math", "code"]
    hub = HubRegistry(endpoint, token=token)
    assert Library.open(hub, "clitester/lib").names == ["math", "code"]


def test_every_command_on_the_hub_with_a_token(hub_server, make_expert):
    hub = ["-r", hub_server.endpoint, "--token", hub_server.create_token("clihub")]
    # The token is what lets the pushes below through.
    assert "refused the token" in quiver_error("push", make_expert(), "clihub/math", "-r", hub[1])
    quiver("push", make_expert("math"), "clihub/math", "--task", "math", "--tag", "v1", *hub)
    assert "clihub/math" in quiver("search", "--task", "math", "--author", "clihub", *hub)
    assert "No match." in quiver("search", "--task", "code", "--author", "clihub", *hub)
    pulled = Path(quiver("pull", "clihub/math", "--revision", "v1", *hub).strip())
    assert HubRegistry(hub_server.endpoint).pull("clihub/math").path == pulled

    quiver("library", "create", "clihub/lib", "--base-model", BASE, *hub)
    quiver("library", "add", "clihub/lib", "clihub/math", *hub)
    quiver("library", "add", "clihub/lib", make_expert("code"), *hub)
    assert "code" not in quiver("library", "remove", "clihub/lib", "code", *hub)
    shown = quiver("library", "show", "clihub/lib", *hub)
    assert "math" in shown and "clihub/math@" in shown
    library = Library.open(HubRegistry(hub_server.endpoint), "clihub/lib")
    assert library.names == ["math"]
    messages = [version.message for version in library.versions()]
    assert messages[:3] == ["Remove expert code", "Add expert code", "Add expert math"]


def run_quiver(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The installed CLI's entry point, in a fresh process."""
    code = "from quiver.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_errors_are_one_line_and_exit_1(tmp_path):
    result = run_quiver("pull", "nobody/nothing", "-r", str(tmp_path / "store"))
    assert result.returncode == 1
    assert "error: no repo 'nobody/nothing'" in result.stderr
    assert "Traceback" not in result.stderr


def test_registry_hf_is_huggingface_co():
    for command in (["pull", "nobody/nothing"], ["search", "--task", "math"]):
        result = run_quiver(*command, "-r", "hf", HF_HUB_OFFLINE="1")  # no request leaves
        assert result.returncode == 1, result.stderr
        assert "error:" in result.stderr and "cannot reach https://huggingface.co" in result.stderr
