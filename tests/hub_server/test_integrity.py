"""Every failure of the server is a clear JSON error (never a 500 or a reset connection), every
CLI failure one line; the Hub's conventions for short shas and repo-name casing; unsupported
features said so. Through the real clients: huggingface_hub, the `hf` CLI and the quiver CLI."""

import base64
import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from quiver.registry import HubRegistry, LocalRegistry
from quiver.server import HubServer
from quiver.store import RepoStore
from quiver.store.blobs import BlobWriter
from quiver.testing import make_random_expert, tiny_model

HF = str(Path(sys.executable).with_name("hf"))


def run_quiver(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = "from quiver.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and "Serving" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def owner(hub_server):
    token = hub_server.create_token("ivy")
    api = HfApi(token=token)
    api.create_repo("ivy/repo")
    api.upload_file(path_or_fileobj=b"one", path_in_repo="one.txt", repo_id="ivy/repo")
    return api


def _line(key: str, value: dict) -> bytes:
    return json.dumps({"key": key, "value": value}).encode() + b"\n"


_COMMIT = "/api/models/ivy/repo/commit/main"
_HEADER = _line("header", {"summary": "s"})
_FILE = {"path": "f.txt", "content": base64.b64encode(b"f").decode()}


@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        ("POST", "/api/repos/create", {"name": 123}, "body.name"),
        ("POST", "/api/repos/create", {}, "body.name"),
        ("POST", "/api/repos/create", {"name": "x", "private": "perhaps"}, "body.private"),
        ("DELETE", "/api/repos/delete", {"name": ["ivy/repo"]}, "body.name"),
        ("PUT", "/api/models/ivy/repo/settings", {"private": {"yes": 1}}, "body.private"),
        ("POST", "/api/models/ivy/repo/tag/main", {"tag": 5}, "body.tag"),
        ("POST", "/api/models/ivy/repo/branch/dev", {"startingPoint": 3}, "startingPoint"),
        ("POST", "/api/models/ivy/repo/preupload/main", {"files": [{"path": 5}]}, "path"),
        ("POST", "/api/models/ivy/repo/preupload/main", {"files": "all"}, "body.files"),
        ("POST", "/api/validate-yaml", {"content": 3}, "body.content"),
        ("POST", "/ivy/repo.git/info/lfs/objects/batch", {"objects": []}, "body.operation"),
        ("POST", _COMMIT, [_HEADER, _line("file", {**_FILE, "path": 5})], "value.path"),
        ("POST", _COMMIT, [_HEADER, _line("file", {"path": "f"})], "value.content"),
        ("POST", _COMMIT, [_line("header", {"summary": 5})], "value.summary"),
        ("POST", _COMMIT, [_HEADER, _line("lfsFile", {"path": "w"})], "value.oid"),
        ("POST", _COMMIT, [_HEADER, _line("upload", {})], "key"),
        ("POST", _COMMIT, [b'{"key": "header", "value": 1}\n'], "value"),
        ("POST", "/api/repos/create", [b"[" * 5000 + b"]" * 5000], "error parsing the body"),
    ],
)  # fmt: skip
def test_malformed_fields_get_a_json_400_naming_the_field(
    hub_server, owner, method, url, body, field
):
    before = owner.model_info("ivy/repo").sha
    content = b"".join(body) if isinstance(body, list) else json.dumps(body).encode()
    response = httpx.request(
        method,
        hub_server.endpoint + url,
        content=content,
        headers={"Authorization": f"Bearer {owner.token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert field in message and message == " ".join(message.split())  # one line
    assert field in response.headers["X-Error-Message"]
    assert owner.model_info("ivy/repo").sha == before
    assert [b.name for b in owner.list_repo_refs("ivy/repo").branches] == ["main"]


def test_a_card_whose_yaml_would_explode_is_refused_not_expanded(owner, hub_server):
    """Each line of this card refers to the one before ten times: 10**9 strings once expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    readme = ("---\n" + "\n".join(lines) + "\ntags: *a8\n---\n").encode()
    owner.create_repo("ivy/cards")
    with pytest.raises(
        ValueError, match=r"aliases \(\*name\) are not allowed, at README.md line 3"
    ):
        owner.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id="ivy/cards")
    # Past the client's validation, straight to the commit: it lands, with no card to expand.
    response = httpx.post(
        f"{hub_server.endpoint}/api/models/ivy/cards/commit/main",
        content=_HEADER
        + _line("file", {"path": "README.md", "content": base64.b64encode(readme).decode()}),
        headers={"Authorization": f"Bearer {owner.token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    info = owner.model_info("ivy/cards")
    assert (info.card_data, info.tags) == (None, [])
    # A README too big to be a card is stored, and not parsed in the commit's transaction.
    big = b"---\ntags: [big]\n---\n" + b"x" * (2 << 20)
    owner.upload_file(path_or_fileobj=big, path_in_repo="README.md", repo_id="ivy/cards")
    info = owner.model_info("ivy/cards")
    assert (info.card_data, info.tags) == (None, [])
    assert httpx.get(f"{hub_server.endpoint}/ivy/cards/resolve/main/README.md").content == big


def test_a_bug_of_the_server_is_answered_in_json(owner, hub_server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    refs = f"{hub_server.endpoint}/api/models/ivy/repo/refs"
    monkeypatch.setattr(type(hub_server.store), "refs", broken)
    response = httpx.get(refs)
    assert (response.status_code, response.json()) == (
        500,
        {"error": "internal error of quiver hub serve: RuntimeError('a bug')"},
    )
    monkeypatch.undo()
    assert httpx.get(refs).status_code == 200


def test_a_short_sha_resolves_as_a_unique_prefix(owner, tmp_path, hub_server):
    first = owner.upload_file(path_or_fileobj=b"v1", path_in_repo="v.txt", repo_id="ivy/repo").oid
    owner.upload_file(path_or_fileobj=b"v2", path_in_repo="v.txt", repo_id="ivy/repo")
    short = first[:7]
    assert owner.model_info("ivy/repo", revision=short).sha == first
    path = hf_hub_download("ivy/repo", "v.txt", revision=short, cache_dir=tmp_path / "hub")
    assert Path(path).read_bytes() == b"v1"
    with pytest.raises(RevisionNotFoundError):
        owner.model_info("ivy/repo", revision=first[:6])  # git's shortest is 7
    # The hf CLI and the quiver CLI, with the short sha.
    env = {**os.environ, "HF_ENDPOINT": hub_server.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf")}
    hf = subprocess.run(
        [HF, "download", "ivy/repo", "v.txt", "--revision", short],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert hf.returncode == 0, hf.stderr
    assert (tmp_path / "hf" / "models--ivy--repo" / "snapshots" / first / "v.txt").read_bytes() == (
        b"v1"
    )
    local = LocalRegistry(tmp_path / "store")
    expert = make_random_expert(tiny_model("llama", seed=0), tmp_path / "expert", rank=2)
    pushed = local.push(expert, "ivy/expert")
    local.push(
        make_random_expert(tiny_model("llama"), tmp_path / "e2", rank=2, seed=5), "ivy/expert"
    )
    pulled = run_quiver("pull", "ivy/expert", "--revision", pushed.commit[:7], "-r", local.root)
    assert pulled.returncode == 0, pulled.stderr
    assert Path(pulled.stdout.strip().splitlines()[-1]).name == pushed.commit


def test_repo_names_compare_case_insensitively_as_on_the_hub(hub_server, tmp_path):
    api = HfApi(token=hub_server.create_token("Kim"))
    api.create_repo("kim/Math")
    with pytest.raises(HfHubHTTPError) as taken:
        api.create_repo("KIM/math")
    assert taken.value.response.status_code == 409
    assert "kim/Math" in str(taken.value)
    assert api.create_repo("Kim/MATH", exist_ok=True).repo_id == "kim/Math"
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="KIM/MATH")
    assert api.model_info("kim/math").id == "kim/Math"  # the name as created
    path = hf_hub_download("Kim/math", "x.txt", cache_dir=tmp_path / "hub", token=False)
    assert Path(path).read_bytes() == b"x"
    assert [m.id for m in api.list_models(author="KIM")] == ["kim/Math"]
    # The same rule in the local registry, which shares the store.
    local = LocalRegistry(tmp_path / "store")
    model = tiny_model("llama", seed=0)
    first = local.push(make_random_expert(model, tmp_path / "a", rank=2), "Bob/Expert")
    second = local.push(make_random_expert(model, tmp_path / "b", rank=2, seed=3), "bob/expert")
    assert [v.commit for v in local.versions("BOB/EXPERT")] == [second.commit, first.commit]
    assert [hit.repo_id for hit in local.list(author="bob")] == ["Bob/Expert"]


def test_unsupported_hub_features_say_so(owner, hub_server):
    calls = {
        "move_repo": lambda: owner.move_repo("ivy/repo", "ivy/moved"),
        "super_squash_history": lambda: owner.super_squash_history("ivy/repo"),
        "duplicate_repo": lambda: owner.duplicate_repo("ivy/repo"),
        "discussions": lambda: list(owner.get_repo_discussions("ivy/repo")),
        "pull request": lambda: owner.create_pull_request("ivy/repo", title="t"),
        "create_pr": lambda: owner.upload_file(
            path_or_fileobj=b"p", path_in_repo="p.txt", repo_id="ivy/repo", create_pr=True
        ),
        "'spaces'": lambda: owner.space_info("ivy/space"),
    }
    for name, call in calls.items():
        with pytest.raises(HfHubHTTPError) as refused:
            call()
        assert refused.value.response.status_code == 501, name
        assert "not supported by quiver hub serve" in str(refused.value), name
    hf = subprocess.run(
        [HF, "repos", "move", "ivy/repo", "ivy/moved"],
        env={**os.environ, "HF_ENDPOINT": hub_server.endpoint, "HF_TOKEN": owner.token},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert hf.returncode != 0 and "not supported by quiver hub serve" in hf.stdout + hf.stderr
    # Access checks are supported: they answer as the Hub does.
    owner.auth_check("ivy/repo", write=True)
    stranger = HfApi(token=hub_server.create_token("ned"))
    stranger.auth_check("ivy/repo")
    with pytest.raises(HfHubHTTPError) as forbidden:
        stranger.auth_check("ivy/repo", write=True)
    assert forbidden.value.response.status_code == 403
    owner.create_repo("ivy/hidden", private=True)
    with pytest.raises(RepositoryNotFoundError):
        stranger.auth_check("ivy/hidden")


def test_size_and_path_errors_give_the_right_hint(tmp_path):
    with HubServer(tmp_path / "hub", max_body_bytes=50_000) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("lou"))
        api.create_repo("lou/repo")
        with pytest.raises(HfHubHTTPError) as one_big_file:
            api.upload_file(
                path_or_fileobj=os.urandom(40_000), path_in_repo="w.bin", repo_id="lou/repo"
            )
        message = str(one_big_file.value)
        assert one_big_file.value.response.status_code == 413
        assert "w.bin is 40000 bytes" in message and "--max-body-bytes" in message
        assert "commit" not in message.split("w.bin", 1)[1].replace("in the commit", "")
        many = [CommitOperationAdd(f"f{i}.bin", os.urandom(15_000)) for i in range(3)]
        with pytest.raises(HfHubHTTPError) as many_files:
            api.create_commit("lou/repo", many, commit_message="too much at once")
        assert many_files.value.response.status_code == 413
        assert "commit fewer files at once" in str(many_files.value)
        with pytest.raises(HfHubHTTPError) as doubled:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="a//b.txt", repo_id="lou/repo")
        assert "empty segment" in str(doubled.value) and "'..'" not in str(doubled.value)
        assert [s.rfilename for s in api.model_info("lou/repo").siblings] == [".gitattributes"]


def test_cli_failures_are_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    for command in (
        ["hub", "serve", "--root", a_file],
        ["hub", "token", "create", "alice", "--root", a_file],
        ["hub", "gc", "--root", a_file],
    ):
        assert_one_line_error(run_quiver(*command), str(a_file), "is a file, not a folder")
    root = tmp_path / "hub"
    assert_one_line_error(run_quiver("hub", "serve", "--root", root, "--port", "99999"), "99999")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_quiver("hub", "serve", "--root", root, "--port", port)
    assert_one_line_error(result, f"127.0.0.1:{port}", "in use")


def test_hub_registry_push_error_from_the_server_is_one_line(tmp_path):
    """A refusal of the server reaches a quiver user as one line, with the server's reason."""
    with HubServer(tmp_path / "hub", max_body_bytes=20_000) as hub:
        token = hub.create_token("max")
        folder = make_random_expert(tiny_model("llama", seed=0), tmp_path / "e", rank=4)
        env = {**os.environ, "HF_TOKEN": token}
        result = run_quiver("push", folder, "max/expert", "-r", hub.endpoint, env=env)
        assert_one_line_error(result, "adapter_model.safetensors is", "--max-body-bytes")
        assert HubRegistry(hub.endpoint, token=token).list(author="max") == []


def _assert_full_then_fine(api: HfApi, repo: str, root: Path, before: str, refused) -> None:
    """The refusal is a one-line 507; nothing was half-written; the next requests work."""
    assert refused.value.response.status_code == 507
    message = refused.value.response.json()["error"]
    assert "no space left" in message and "\n" not in message
    assert api.model_info(repo).sha == before  # no half commit
    assert list((root / "tmp").iterdir()) == []
    api.upload_file(path_or_fileobj=b"small", path_in_repo="small.txt", repo_id=repo)
    assert "small.txt" in {s.rfilename for s in api.model_info(repo).siblings}
    with sqlite3.connect(root / "store.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_full_disk_is_a_clear_error_and_the_store_stays_consistent(tmp_path, small_disk):
    """A real full disk (a 3 MiB tmpfs) under the server and under a local push."""
    disk = small_disk("3m")
    with HubServer(disk / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("flo"))
        api.create_repo("flo/repo")
        before = api.model_info("flo/repo").sha
        with pytest.raises(HfHubHTTPError) as refused:
            api.upload_file(
                path_or_fileobj=os.urandom(4 << 20), path_in_repo="big.bin", repo_id="flo/repo"
            )
        _assert_full_then_fine(api, "flo/repo", disk / "hub", before, refused)

        store = LocalRegistry(disk / "store")
        model = tiny_model("llama", seed=0)
        first = store.push(make_random_expert(model, tmp_path / "e1", rank=4), "flo/expert")
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 8192))  # 8 KiB left: less than an expert
        expert = make_random_expert(model, tmp_path / "e2", rank=4, seed=1)
        result = run_quiver("push", expert, "flo/expert", "-r", disk / "store")
        assert_one_line_error(result, "no space left on the disk of the store")
        (disk / "filler").unlink()
        assert [v.commit for v in store.versions("flo/expert")] == [first.commit]
        assert list((disk / "store" / "tmp").iterdir()) == []


def test_writes_that_fail_after_n_bytes_leave_the_store_consistent(tmp_path, monkeypatch):
    """The same, by fault injection: blob writes fail once a byte budget is spent, then SQLite
    cannot grow its database file."""
    with HubServer(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("gil"))
        api.create_repo("gil/repo")
        before = api.model_info("gil/repo").sha
        budget = {"bytes": 100_000}
        real_write = BlobWriter.write

        def write_until_full(self, chunk: bytes) -> None:
            budget["bytes"] -= len(chunk)
            if budget["bytes"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write(self, chunk)

        with monkeypatch.context() as patched:
            patched.setattr(BlobWriter, "write", write_until_full)
            with pytest.raises(HfHubHTTPError) as refused:
                api.upload_file(
                    path_or_fileobj=os.urandom(200_000), path_in_repo="b.bin", repo_id="gil/repo"
                )
        _assert_full_then_fine(api, "gil/repo", tmp_path / "hub", before, refused)

        before = api.model_info("gil/repo").sha
        real_connect = RepoStore._connect

        @contextmanager
        def database_full(self):
            with real_connect(self) as db:
                pages = db.execute("PRAGMA page_count").fetchone()[0]
                db.execute(f"PRAGMA max_page_count = {pages}")
                yield db

        with monkeypatch.context() as patched:
            patched.setattr(RepoStore, "_connect", database_full)
            many = [CommitOperationAdd(f"m/{i}.txt", os.urandom(64)) for i in range(300)]
            with pytest.raises(HfHubHTTPError) as refused:
                api.create_commit("gil/repo", many, commit_message="300 files")
        _assert_full_then_fine(api, "gil/repo", tmp_path / "hub", before, refused)
