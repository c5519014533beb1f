"""A push destroys nothing it did not create: never a model or a library, an expert repo's other
files only when asked, and a library push moves no expert repo that holds other weights unless
asked. Every refusal comes before anything is written."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from peft import get_peft_model
from registry_helpers import ia3_config, store_state
from typer.testing import CliRunner

from quiver.cli import app
from quiver.errors import ConflictError, InvalidInputError
from quiver.registry import Expert, HubRegistry, Library, LocalRegistry
from quiver.testing import tiny_model, tiny_tokenizer

BASE = "quiver-testing/tiny-llama"
_users = (f"owner{i}" for i in itertools.count())


def quiver(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def user(hub_server):
    return next(_users)


@pytest.fixture
def token(hub_server, user):
    return hub_server.create_token(user)


def _state(repo_id):
    """A Hub repo's main, as plain huggingface_hub sees it: commit and files."""
    info = HfApi().model_info(repo_id, files_metadata=False)
    return info.sha, sorted(sibling.rfilename for sibling in info.siblings)


def test_a_push_never_replaces_a_model_a_library_or_another_adapter(
    hub_server, user, token, make_expert
):
    model = f"{user}/model"
    tiny_model("llama").push_to_hub(model, token=token)  # transformers' own push
    tiny_tokenizer().push_to_hub(model, token=token)
    get_peft_model(tiny_model("llama"), ia3_config()).push_to_hub(f"{user}/ia3", token=token)
    hub = HubRegistry(hub_server.endpoint, token=token)
    Library.create(hub, f"{user}/lib", base_model=BASE)
    holdings = {
        model: "a model (config.json and weights)",
        f"{user}/lib": "a Quiver library",
        f"{user}/ia3": "an adapter that is not a plain LoRA",
    }
    for repo_id, holds in holdings.items():
        before = _state(repo_id)
        for extra in ([], ["--replace"], ["--branch", "dev"]):
            code, out, err = quiver(
                "push", make_expert(), repo_id, *extra, "-r", hub_server.endpoint, "--token", token
            )
            assert (code, out) == (1, "")
            assert err == (
                f"error: {repo_id} in {hub_server.endpoint} holds {holds}, not a LoRA expert: "
                f"refusing to replace it (publish under another name, or delete {repo_id} first)\n"
            )
        assert _state(repo_id) == before
        assert [ref.name for ref in HfApi().list_repo_refs(repo_id).branches] == ["main"]
    assert "model.safetensors" in _state(model)[1] and "tokenizer.json" in _state(model)[1]


def test_a_library_in_a_local_store_is_not_replaced_by_an_expert(local, make_expert):
    Library.create(local, "alice/lib", base_model=BASE).add(make_expert("code"))
    before = store_state(local)
    with pytest.raises(ConflictError, match=r"alice/lib .* holds a Quiver library") as error:
        local.push(make_expert(), "alice/lib")
    assert (error.value.repo_id, error.value.revision) == ("alice/lib", before[0]["alice/lib"][0])
    assert store_state(local) == before


@pytest.mark.parametrize("where", ["local", "hub"])
def test_a_push_onto_an_expert_keeps_its_other_files_unless_replace(
    where, hub_server, token, user, local, make_expert, tmp_path
):
    registry = local if where == "local" else HubRegistry(hub_server.endpoint, token=token)
    repo_id = f"{user}/math"
    first = registry.push(make_expert(seed=1), repo_id)
    extra = tmp_path / "extra"
    (extra / "notes").mkdir(parents=True)
    (extra / "notes" / "eval.md").write_text("accuracy 0.42")
    registry.upload(repo_id, extra, message="the user's notes", replace=False)

    second = registry.push(make_expert(seed=2), repo_id)
    files = sorted(registry.files(repo_id, revision=second.commit))
    assert files[-1] == "notes/eval.md"
    pulled = registry.pull(repo_id)
    assert pulled.weights_sha256 == second.weights_sha256 != first.weights_sha256

    third = registry.push(make_expert(seed=3), repo_id, replace=True)
    assert "notes/eval.md" not in registry.files(repo_id, revision=third.commit)
    assert registry.pull(repo_id).weights_sha256 == third.weights_sha256


def test_invalid_tag_or_branch_is_refused_before_anything_is_written(
    hub_server, token, user, make_expert
):
    hub = ["-r", hub_server.endpoint, "--token", token]
    for option, name in [
        ("--tag", "v 1"),
        ("--tag", "v1..2"),
        ("--branch", "dev~1"),
        ("--tag", ""),
    ]:
        code, out, err = quiver("push", make_expert(), f"{user}/e", option, name, *hub)
        assert (code, out) == (1, "")
        kind = option.removeprefix("--")
        assert err.startswith(f"error: invalid {kind} name {name!r} (use letters"), err
    assert not HfApi().repo_exists(f"{user}/e")
    with pytest.raises(InvalidInputError) as error:
        HubRegistry(hub_server.endpoint, token=token).push(make_expert(), f"{user}/e", tag="a:b")
    assert error.value.revision == "a:b"


def _library_in_store(store, user, make_expert, tmp_path):
    """``user/lib`` in a local store: ``math`` referenced, ``code`` bundled, one artifact."""
    from safetensors.torch import save_file
    from torch import ones

    local = LocalRegistry(store)
    local.push(Expert.from_folder(make_expert("math", seed=10), tasks=["math"]), f"{user}/math")
    library = Library.create(local, f"{user}/lib", base_model=BASE)
    library.add(f"{user}/math")
    library.add(make_expert("code"))
    save_file({"math": ones(2)}, tmp_path / "prototypes.safetensors")
    return library.add_artifact("arrow_prototypes", tmp_path / "prototypes.safetensors")


def test_library_push_moves_no_expert_repo_that_holds_other_weights(
    hub_server, user, token, make_expert, tmp_path
):
    store = tmp_path / "store"
    library = _library_in_store(store, user, make_expert, tmp_path)
    hub = HubRegistry(hub_server.endpoint, token=token)
    theirs = hub.push(make_expert("other-math", seed=99), f"{user}/math")  # someone else's math
    Library.create(hub, f"{user}/lib", base_model=BASE)
    before = {repo: _state(repo) for repo in (f"{user}/math", f"{user}/lib")}
    ours = library.experts[0].sha256
    push = ["library", "push", f"{user}/lib", "--from", store, "-r", hub_server.endpoint]

    code, out, err = quiver(*push, "--token", token)
    assert (code, out) == (1, "")
    assert err == (
        f"error: expert repos in {hub_server.endpoint} already hold other weights: {user}/math "
        f"holds sha256 {theirs.weights_sha256[:16]}…, the library pins {ours[:16]}… (pass "
        "overwrite=True (quiver library push --overwrite) to move their main to the library's "
        "weights)\n"
    )
    assert {repo: _state(repo) for repo in before} == before  # nothing written
    assert not HfApi().repo_exists(f"{user}/code")

    code, out, err = quiver(*push, "--overwrite", "--token", token)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"Pushed {user}/lib@")
    assert lines[1:] == [
        f"  experts pushed: {user}/math",
        f"  overwritten (their main held sha256): {user}/math {theirs.weights_sha256[:16]}…",
    ]
    assert hub.pull(f"{user}/math").weights_sha256 == ours
    assert hub.versions(f"{user}/math")[1].commit == theirs.commit  # moved, history kept

    code, out, _ = quiver(*push, "--token", token)
    assert code == 0 and out.splitlines()[1:] == [f"  already there: {user}/math"]


def test_library_push_says_which_artifacts_it_replaced(local, make_expert, tmp_path):
    from safetensors.torch import save_file
    from torch import zeros

    library = _library_in_store(local.root, "alice", make_expert, tmp_path)
    other = LocalRegistry(tmp_path / "other")
    assert library.push(other).replaced_artifacts == ()
    save_file({"math": zeros(2)}, tmp_path / "new.safetensors")
    library.add_artifact("arrow_prototypes", tmp_path / "new.safetensors")
    report = library.push(other)
    assert report.replaced_artifacts == ("arrow_prototypes",)
    assert report.already_there == ("alice/math",)
    with pytest.raises(ConflictError, match=r"alice/math .* holds a LoRA expert, not a Quiver"):
        library.push(other, "alice/math")  # a library is never pushed over an expert


def test_a_push_whose_writes_fail_is_one_line_and_leaves_the_store_as_it_was(tmp_path, make_expert):
    """Fault injection without root: a file-size limit makes the store's writes fail as a full
    disk would (EFBIG instead of ENOSPC), in a fresh process running the real entry point."""
    store = tmp_path / "store"
    assert quiver("push", make_expert("small", rank=1), "alice/small", "-r", store)[0] == 0
    before = store_state(LocalRegistry(store))
    big = make_expert("big", rank=64)
    limit = (big / "adapter_model.safetensors").stat().st_size // 2
    code = (
        f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "from quiver.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "push", str(big), "alice/big", "-r", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("error: push alice/big: cannot write (")
    assert result.stderr.endswith(
        "): File too large (free some disk space or fix the folder's permissions, then push "
        "again)\n"
    )
    assert result.stderr.count("\n") == 1
    assert store_state(LocalRegistry(store)) == before


@pytest.mark.parametrize("where", ["local", "hub"])
def test_a_folder_with_what_a_repo_cannot_hold_is_refused_before_writing(
    where, hub_server, token, user, local, tmp_path
):
    registry = local if where == "local" else HubRegistry(hub_server.endpoint, token=token)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("fine")
    spoilers = [
        (lambda: os.mkfifo(folder / "pipe"), "pipe is not a regular file"),  # reads would block
        (lambda: (folder / "gone").symlink_to(tmp_path / "nowhere"), "gone is not a regular"),
        (lambda: Path(os.fsdecode(bytes(folder) + b"/caf\xe9.txt")).touch(), "not valid UTF-8"),
    ]
    for spoil, message in spoilers:
        spoil()
        with pytest.raises(InvalidInputError, match=message):
            registry.upload(f"{user}/notes", folder, message="notes")
        for entry in list(folder.iterdir()):
            if entry.name != "notes.txt":
                entry.unlink()
    assert registry.head(f"{user}/notes") is None
    registry.upload(f"{user}/notes", folder, message="notes")
    assert "notes.txt" in registry.files(f"{user}/notes", revision="main")


@pytest.mark.parametrize("where", ["local", "hub"])
def test_of_two_first_pushes_one_lands_and_the_other_is_told(
    where, hub_server, token, user, local, make_expert
):
    """Two pushes to a repo that does not exist yet: the one that finds it created meanwhile
    (by the other, here landing right after the look) is refused, instead of landing on top."""
    registry = local if where == "local" else HubRegistry(hub_server.endpoint, token=token)
    repo_id, landed = f"{user}/race", []

    def looked_before_the_other_push_landed(repo_id: str) -> dict:
        del registry._refs_if_any  # the other push, unhindered
        landed.append(registry.push(make_expert(seed=1), repo_id))
        return {}

    registry._refs_if_any = looked_before_the_other_push_landed
    with pytest.raises(ConflictError, match="another writer") as refused:
        registry.push(make_expert(seed=2), repo_id)
    assert refused.value.repo_id == repo_id
    assert registry.head(repo_id) == landed[0].commit
    assert registry.pull(repo_id).weights_sha256 == landed[0].weights_sha256
