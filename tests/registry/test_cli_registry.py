"""The registry commands of the ``quiver`` CLI, over a local store and the self-hosted Hub."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quiver.cli import app
from quiver.registry import HubRegistry, Library, LocalRegistry
from quiver.store import StorageFullError
from quiver.testing import make_random_expert

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
    """The installed entry point: a typed error is one line on stderr, exit code 1."""
    for command in (["pull", "nobody/nothing"], ["search", "--task", "math"]):
        result = run_quiver(*command, "-r", str(tmp_path / "typo"))
        assert result.returncode == 1
        assert result.stderr == (
            f"error: no Quiver store at {tmp_path / 'typo'} (check the path; pushing to a folder "
            "(quiver push, quiver library create) makes it a store)\n"
        )
    assert not (tmp_path / "typo").exists()


def test_registry_hf_is_huggingface_co():
    for command in (["pull", "nobody/nothing"], ["search", "--task", "math"]):
        result = run_quiver(*command, "-r", "hf", HF_HUB_OFFLINE="1")  # no request leaves
        assert result.returncode == 1, result.stderr
        assert "error:" in result.stderr and "cannot reach https://huggingface.co" in result.stderr


def test_a_pull_returns_only_what_the_endpoint_it_asked_holds(hub_server, make_expert, tmp_path):
    """After a pull from the self-hosted Hub, other endpoints (huggingface.co, a typo, a dead
    port) must not answer with its files, online or with HF_HUB_OFFLINE=1."""
    endpoint = hub_server.endpoint
    token = hub_server.create_token("bytes")
    quiver("push", make_expert(), "bytes/math", "-r", endpoint, "--token", token)
    folder = quiver("pull", "bytes/math", "-r", endpoint).strip()
    assert Path(folder, "adapter_model.safetensors").is_file()
    dead = quiver_error("pull", "bytes/math", "-r", "http://127.0.0.1:9")  # nothing listens
    assert dead.startswith("error: pull bytes/math@main: cannot reach http://127.0.0.1:9 and")
    offline = run_quiver("pull", "bytes/math", "-r", "hf", HF_HUB_OFFLINE="1")
    assert (offline.returncode, offline.stdout) == (1, "")
    assert "cannot reach https://huggingface.co" in offline.stderr
    offline = run_quiver("pull", "bytes/math", "-r", endpoint, HF_HUB_OFFLINE="1")
    assert (offline.returncode, offline.stdout.strip()) == (0, folder)  # its own cache works


def test_a_failed_pull_or_search_says_why_in_one_line(hub_server, make_expert, small_disk):
    """An endpoint that answers with an error is not called unreachable; the retries of a dead
    one print nothing; a full disk under the cache is a StorageFullError."""
    token = hub_server.create_token("why")
    quiver("push", make_expert(rank=16), "why/math", "-r", hub_server.endpoint, "--token", token)
    wrong = quiver_error("pull", "why/math", "-r", f"{hub_server.endpoint}/wrong")
    assert wrong.startswith(f"error: pull why/math@main: {hub_server.endpoint}/wrong answered 501")
    assert "not supported by quiver hub serve" in wrong
    no_waiting = "import huggingface_hub.utils._http as http; http.time.sleep = lambda s: None; "
    code = no_waiting + "from quiver.cli import main; main()"
    dead = subprocess.run(
        [sys.executable, "-c", code, "search", "-r", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (dead.returncode, dead.stderr) == (
        1,
        "error: search: cannot reach http://127.0.0.1:9 (check the endpoint URL and your "
        "network)\n",
    )
    hub = HubRegistry(hub_server.endpoint, cache_dir=small_disk("64k"))
    with pytest.raises(StorageFullError, match="no space left on the disk of") as full:
        hub.pull("why/math")
    assert full.value.repo_id == "why/math"


def test_a_mistyped_registry_creates_no_store(tmp_path, make_expert, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (
        ["pull", "alice/math"],
        ["search"],
        ["library", "show", "alice/lib"],
        ["library", "add", "alice/lib", "alice/math"],
        ["library", "push", "alice/lib", "--from", "./does-not-exist", "-r", "./elsewhere"],
    ):
        if "--from" not in command:
            command = [*command, "-r", "./does-not-exist"]
        assert "error: no Quiver store at does-not-exist (" in quiver_error(*command)
    for scheme in ("ftp://x", "s3://bucket/store", "http:/127.0.0.1:8000", "HTTPS:host"):
        assert "is not an http(s) Hub endpoint" in quiver_error(
            "push", make_expert(), "a/b", "-r", scheme
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["experts"]
    # Publishing commands make the store.
    quiver("push", make_expert(), "alice/math", "-r", "./new-store")
    quiver("library", "create", "alice/lib", "--base-model", BASE, "-r", "./other-store")
    assert LocalRegistry("new-store", create=False).list()[0].repo_id == "alice/math"
    assert LocalRegistry("other-store", create=False).list()[0].repo_id == "alice/lib"


def test_hints_name_the_cli_option_or_command(tmp_path, make_expert):
    store, target = tmp_path / "store", tmp_path / "target"
    quiver("push", make_expert(), "alice/math", "-r", store)
    quiver("library", "create", "alice/lib", "--base-model", BASE, "-r", store)
    assert quiver_error("library", "create", "alice/lib", "--base-model", BASE, "-r", store) == (
        f"error: alice/lib already exists in {store} (change it with "
        "`quiver library add|remove alice/lib ...`, or pick another name)\n"
    )
    error = quiver_error("library", "create", "alice/math", "--base-model", BASE, "-r", store)
    assert error.startswith(f"error: alice/math already exists in {store} and holds a LoRA expert")
    error = quiver_error("library", "push", "alice/other", "--from", store, "-r", target)
    assert error.startswith("error: no repo 'alice/other' in the local registry at ")
    assert error.endswith(
        "(pass --from with the registry that holds the library (default: the local store); "
        "--registry is where it goes)\n"
    )
    assert not target.exists()


README = Path(__file__).parents[2] / "README.md"


def readme_registry_commands() -> list[list[str]]:
    """The ``quiver`` commands of the bash block in the README's Registry section, in order."""
    section = README.read_text().split("\n## Registry\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)[1]
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [words for words in commands if words and words[0] != "export"]


def test_the_readme_cli_block_runs_as_written(hub_server, base_model, tmp_path, monkeypatch):
    """huggingface.co cannot be reached here: ``hf`` becomes our self-hosted Hub, and ``alice``
    a user of its own there; everything else runs as written, from a fresh $QUIVER_HOME."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QUIVER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_TOKEN", hub_server.create_token("readme"))
    for name in ("math", "code", "chat"):
        folder = make_random_expert(base_model, Path("out", f"{name}-lora"), rank=4, seed=len(name))
        config = json.loads((folder / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"  # the README's base model
        (folder / "adapter_config.json").write_text(json.dumps(config))
    commands = readme_registry_commands()
    assert all(words[0] == "quiver" for words in commands)
    assert sum("hf" in words for words in commands) >= 5
    for words in commands:
        out = quiver(
            *[
                hub_server.endpoint if w == "hf" else w.replace("alice/", "readme/")
                for w in words[1:]
            ]
        )
    assert [line.split("\t")[0] for line in out.splitlines()] == ["code", "chat-lora", "math"]
    assert Library.open(HubRegistry(hub_server.endpoint), "readme/skills").experts[0].repo_id == (
        "readme/code"
    )
