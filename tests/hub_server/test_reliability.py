"""Races, crashes and hostile input: the store stays consistent and nothing is lost."""

import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from hub_helpers import server_process
from huggingface_hub import CommitOperationAdd, HfApi, get_session, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from quiver.server import HubServer, HubStore

# `quiver hub serve` whose commits hold their transaction open for 30 s once recorded, so a test
# can kill the server inside one.
PAUSED_IN_COMMIT = """
import sys, time
from quiver.cli import main
from quiver.store import RepoStore

record = RepoStore._record_commit


def record_then_pause(*args, **kwargs):
    sha = record(*args, **kwargs)
    time.sleep(30)
    return sha


RepoStore._record_commit = record_then_pause
sys.exit(main())
"""


def _assert_consistent(endpoint: str, repo: str, expected: dict[str, bytes], cache: Path) -> None:
    """Every listed file downloads with the bytes it was committed with."""
    api = HfApi(endpoint=endpoint, token=False)
    listed = sorted(s.rfilename for s in api.model_info(repo).siblings)
    assert listed == sorted(expected)
    for name, data in expected.items():
        path = hf_hub_download(repo, name, cache_dir=cache, endpoint=endpoint, token=False)
        assert Path(path).read_bytes() == data


def test_racing_commits_with_parent_commit_one_wins_one_conflicts(hub_server):
    api = HfApi(token=hub_server.create_token("racer"))
    repo = "racer/race"
    api.create_repo(repo)
    for round_ in range(5):
        parent = api.model_info(repo).sha
        barrier = threading.Barrier(2)

        def commit(side: str, parent=parent, round_=round_, barrier=barrier) -> str:
            barrier.wait()
            return api.create_commit(
                repo,
                [CommitOperationAdd(f"{side}-{round_}.txt", side.encode())],
                commit_message=f"{side} {round_}",
                parent_commit=parent,
            ).oid

        with ThreadPoolExecutor(2) as pool:
            futures = {side: pool.submit(commit, side) for side in ("left", "right")}
        errors = {side: f.exception() for side, f in futures.items()}
        losers = [side for side, error in errors.items() if error is not None]
        assert len(losers) == 1, errors
        error = errors[losers[0]]
        assert isinstance(error, HfHubHTTPError) and error.response.status_code == 412
        assert "A commit has happened since" in str(error)
        # The loser refreshes and commits again: nothing is lost.
        api.create_commit(
            repo,
            [CommitOperationAdd(f"{losers[0]}-{round_}.txt", losers[0].encode())],
            commit_message=f"{losers[0]} {round_} retry",
            parent_commit=api.model_info(repo).sha,
        )
    files = {s.rfilename for s in api.model_info(repo).siblings}
    assert files == {".gitattributes"} | {
        f"{s}-{r}.txt" for s in ("left", "right") for r in range(5)
    }
    assert len(api.list_repo_commits(repo)) == 1 + 10


@pytest.mark.parametrize("parent", ["empty", "head prefix", "other sha"])
def test_parent_commit_must_be_the_full_head_sha(hub_server, parent):
    token = hub_server.create_token("picky")
    api = HfApi(token=token)
    api.create_repo("picky/repo", exist_ok=True)
    head = api.model_info("picky/repo").sha
    sent = {"empty": "", "head prefix": head[:7], "other sha": "0" * 40}[parent]
    response = httpx.post(
        f"{hub_server.endpoint}/api/models/picky/repo/commit/main",
        content=_ndjson_commit("guarded", {"g.txt": b"g"}, parent=sent),
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == (412 if parent == "other sha" else 400), response.text
    assert api.model_info("picky/repo").sha == head


def test_concurrent_commits_without_parent_all_land(hub_server):
    api = HfApi(token=hub_server.create_token("crowd"))
    repo = "crowd/busy"
    api.create_repo(repo)

    def add(i: int) -> str:
        return api.upload_file(
            path_or_fileobj=f"file {i}".encode(), path_in_repo=f"f{i}.txt", repo_id=repo
        ).oid

    with ThreadPoolExecutor(8) as pool:
        shas = list(pool.map(add, range(8)))
    assert len(set(shas)) == 8
    history = [c.commit_id for c in api.list_repo_commits(repo)]
    assert set(shas) <= set(history) and len(history) == 9
    assert {s.rfilename for s in api.model_info(repo).siblings} == {".gitattributes"} | {
        f"f{i}.txt" for i in range(8)
    }


def _ndjson_commit(summary: str, files: dict[str, bytes], *, parent: str | None = None) -> bytes:
    header = {"summary": summary, "description": ""}
    if parent is not None:
        header["parentCommit"] = parent
    lines = [{"key": "header", "value": header}]
    lines += [
        {
            "key": "file",
            "value": {"path": p, "content": base64.b64encode(d).decode(), "encoding": "base64"},
        }
        for p, d in files.items()
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_server_killed_inside_a_commit_transaction_keeps_the_store_consistent(tmp_path):
    root = tmp_path / "hub"
    token = HubStore(root).create_token("kim", write=True)
    committed = {".gitattributes": None, "base.txt": b"base"}
    with server_process(root) as (_, endpoint):
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo("kim/crash")
        api.upload_file(path_or_fileobj=b"base", path_in_repo="base.txt", repo_id="kim/crash")
        committed[".gitattributes"] = httpx.get(
            f"{endpoint}/kim/crash/resolve/main/.gitattributes"
        ).content
        before = api.model_info("kim/crash").sha

    doomed = os.urandom(200_000)
    paused_quiver = (sys.executable, "-c", PAUSED_IN_COMMIT)
    with server_process(root, quiver=paused_quiver) as (process, endpoint):
        body = _ndjson_commit("doomed", {"big.bin": doomed, "base.txt": b"new"})
        thread = _commit_in_background(endpoint, token, "kim/crash", body)
        # The server holds SQLite's write lock only between BEGIN IMMEDIATE and COMMIT: once it
        # does, the commit is inside its transaction, its blobs already staged.
        deadline = time.monotonic() + 60
        while not _write_locked(root / "store.sqlite"):
            assert time.monotonic() < deadline, "the commit never reached its transaction"
            time.sleep(0.05)
        assert HubStore(root).blobs.has(hashlib.sha256(doomed).hexdigest())
        assert thread.is_alive()  # the client still waits for its commit to finish
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    with server_process(root) as (_, endpoint):
        assert HfApi(endpoint=endpoint).model_info("kim/crash").sha == before
        _assert_consistent(endpoint, "kim/crash", committed, tmp_path / "cache")
        api = HfApi(endpoint=endpoint, token=token)
        api.upload_file(path_or_fileobj=b"after", path_in_repo="after.txt", repo_id="kim/crash")
        _assert_consistent(
            endpoint, "kim/crash", {**committed, "after.txt": b"after"}, tmp_path / "cache2"
        )
    with sqlite3.connect(root / "store.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_server_killed_while_receiving_a_commit_keeps_the_store_consistent(tmp_path):
    root = tmp_path / "hub"
    token = HubStore(root).create_token("kurt", write=True)
    body = _ndjson_commit("half sent", {"x.bin": os.urandom(300_000)})
    with server_process(root) as (process, endpoint):
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo("kurt/crash")
        before = api.model_info("kurt/crash").sha

        def slow_body():
            yield body[: len(body) // 2]
            time.sleep(30)
            yield body[len(body) // 2 :]

        _commit_in_background(endpoint, token, "kurt/crash", slow_body())
        time.sleep(1.0)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    with server_process(root) as (_, endpoint):
        assert HfApi(endpoint=endpoint).model_info("kurt/crash").sha == before
        assert len(HfApi(endpoint=endpoint).list_repo_commits("kurt/crash")) == 1


@contextmanager
def _exchanges():
    """Every request huggingface_hub's shared HTTP client sends, and every status it receives."""
    sent, statuses = [], []
    hooks = get_session().event_hooks

    def on_request(request) -> None:
        sent.append(request.url)

    def on_response(response) -> None:
        statuses.append(response.status_code)

    hooks["request"].append(on_request)
    hooks["response"].append(on_response)
    try:
        yield sent, statuses
    finally:
        hooks["request"].remove(on_request)
        hooks["response"].remove(on_response)


def _write_locked(database: Path) -> bool:
    """Whether another connection holds the database's write lock at this moment."""
    db = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise
        return True
    finally:
        db.close()


def _commit_in_background(endpoint: str, token: str, repo: str, body) -> threading.Thread:
    """POST a commit from a thread with its own HTTP client (the server is about to die under it;
    huggingface_hub's shared session would be reset under the test's own later calls)."""

    def send() -> None:
        with contextlib.suppress(httpx.TransportError):
            httpx.post(
                f"{endpoint}/api/models/{repo}/commit/main",
                content=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def victim(hub_server):
    token = hub_server.create_token("vic")
    api = HfApi(token=token)
    api.create_repo("vic/target")
    api.upload_file(path_or_fileobj=b"safe", path_in_repo="ok.txt", repo_id="vic/target")
    return token


@pytest.mark.parametrize(
    "path",
    [
        "/api/models/vic/..%2F..%2Fetc",
        "/api/models/vic%2Ftarget",
        "/api/models/%2E%2E/target",
        "/api/models/vic/target/revision/main%2F..%2F..",
        "/api/models/vic/target/revision/a%2Fb",
        "/api/models/vic/target/tree/main/%2E%2E",
        "/api/models/vic/target/tree/main/%2Fetc",
        "/api/models/vic/target/tree/main/sub%2F..%2F..%2Fstore.sqlite",
        "/vic/target/resolve/main/..%2Fstore.sqlite",
        "/vic/target/resolve/main/%2E%2E/%2E%2E/store.sqlite",
        "/vic/target/resolve/main//etc/passwd",
        "/vic/target/resolve/main/%2Fetc%2Fpasswd",
        "/vic/target/resolve/%2E%2E/ok.txt",
        "/vic/target/resolve/main/a%5C..%5Cb",
    ],
)
def test_traversal_in_urls_is_refused(hub_server, victim, path):
    response = httpx.get(hub_server.endpoint + path)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "path", ["/vic/target/resolve/main/../../store.sqlite", "/api/models/vic/../x"]
)
def test_literal_dot_segments_are_refused(hub_server, victim, path):
    connection = http.client.HTTPConnection("127.0.0.1", int(hub_server.endpoint.rsplit(":", 1)[1]))
    connection.request("GET", path)  # http.client sends the path as is, without normalising it
    assert connection.getresponse().status == 400
    connection.close()


@pytest.mark.parametrize(
    "bad_path", ["../evil.txt", "/abs.txt", "a/../../b.txt", "a\\b.txt", "a//b.txt", ".git/config"]
)
def test_traversal_in_commit_paths_is_refused(hub_server, victim, bad_path):
    before = HfApi().model_info("vic/target").sha
    response = httpx.post(
        f"{hub_server.endpoint}/api/models/vic/target/commit/main",
        content=_ndjson_commit("evil", {"fine.txt": b"x", bad_path: b"evil"}),
        headers={"Authorization": f"Bearer {victim}", "Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 400, response.text
    assert HfApi().model_info("vic/target").sha == before


def test_traversal_in_repo_names_and_lfs_oids_is_refused(hub_server, victim):
    headers = {"Authorization": f"Bearer {victim}"}
    created = httpx.post(
        f"{hub_server.endpoint}/api/repos/create", json={"name": "../escape"}, headers=headers
    )
    assert created.status_code == 400
    body = json.dumps({"key": "header", "value": {"summary": "s"}}) + "\n"
    body += json.dumps({"key": "lfsFile", "value": {"path": "w.bin", "oid": "../" * 5 + "x" * 49}})
    committed = httpx.post(
        f"{hub_server.endpoint}/api/models/vic/target/commit/main", content=body, headers=headers
    )
    assert committed.status_code == 400


def test_lfs_upload_urls_are_signed_checked_and_streamed_to_disk(hub_server, victim):
    data = os.urandom(400_000)
    oid = hashlib.sha256(data).hexdigest()
    batch = f"{hub_server.endpoint}/vic/target.git/info/lfs/objects/batch"
    request = {
        "operation": "upload",
        "transfers": ["basic"],
        "objects": [{"oid": oid, "size": len(data)}],
    }
    auth = {"Authorization": f"Bearer {victim}"}
    assert httpx.post(batch, json=request).status_code == 401
    href = httpx.post(batch, json=request, headers=auth).json()["objects"][0]["actions"]["upload"]
    url, blobs = href["href"], hub_server.store.blobs
    assert httpx.put(url.replace("sig=", "sig=0"), content=data).status_code == 403
    assert httpx.put(url.replace("size=400000", "size=1"), content=data[:1]).status_code == 403
    assert httpx.put(url, content=os.urandom(len(data))).status_code == 400
    assert not blobs.has(oid) and list(blobs.tmp.iterdir()) == []

    def half_then_rest():
        yield data[:200_000]
        # The first half reaches the disk while the second is still on its way.
        deadline = time.monotonic() + 30
        while not any(f.stat().st_size >= 200_000 for f in blobs.tmp.iterdir()):
            assert time.monotonic() < deadline, "the upload is held in memory"
            time.sleep(0.02)
        yield data[200_000:]

    assert httpx.put(url, content=half_then_rest()).status_code == 200
    assert blobs.path(oid).read_bytes() == data and list(blobs.tmp.iterdir()) == []
    again = httpx.post(batch, json=request, headers=auth).json()["objects"][0]
    assert "actions" not in again  # stored once, never asked for again


def test_commit_streamed_in_tiny_chunks_lands_intact(hub_server, victim):
    files = {"one.txt": b"first file", "two/deep.bin": os.urandom(5000)}
    body = _ndjson_commit("tiny chunks", files)
    response = httpx.post(
        f"{hub_server.endpoint}/api/models/vic/target/commit/main",
        content=(body[i : i + 7] for i in range(0, len(body), 7)),
        headers={"Authorization": f"Bearer {victim}"},
    )
    assert response.status_code == 200, response.text
    sha = response.json()["commitOid"]
    for name, data in files.items():
        url = f"{hub_server.endpoint}/vic/target/resolve/{sha}/{name}"
        assert httpx.get(url).content == data


def test_malformed_bodies_get_a_typed_400(hub_server, victim):
    response = httpx.post(
        f"{hub_server.endpoint}/api/models/vic/target/preupload/main",
        content=b"{not json",
        headers={"Authorization": f"Bearer {victim}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert "malformed request" in response.headers["X-Error-Message"]
    commit = httpx.post(
        f"{hub_server.endpoint}/api/models/vic/target/commit/main",
        content=b'{"key": "header"}\nnot json\n',
        headers={"Authorization": f"Bearer {victim}"},
    )
    assert commit.status_code == 400
    assert "line 1" in commit.headers["X-Error-Message"]


def test_oversized_bodies_are_refused_with_413(tmp_path):
    with HubServer(tmp_path / "hub", max_body_bytes=50_000) as hub:
        token = hub.create_token("big")
        api = HfApi(endpoint=hub.endpoint, token=token)
        api.create_repo("big/repo")
        before = api.model_info("big/repo").sha
        with pytest.raises(HfHubHTTPError) as refused:
            api.upload_file(
                path_or_fileobj=os.urandom(60_000), path_in_repo="w.bin", repo_id="big/repo"
            )
        assert refused.value.response.status_code == 413

        def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(10):
                yield b"x" * 10_000

        response = httpx.post(
            f"{hub.endpoint}/api/models/big/repo/commit/main",
            content=chunked(),
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 413
        assert api.model_info("big/repo").sha == before
        api.upload_file(path_or_fileobj=b"small", path_in_repo="s.txt", repo_id="big/repo")


def test_serve_options_reach_the_server(tmp_path):
    root = tmp_path / "hub"
    token = HubStore(root).create_token("opt", write=True)
    options = ("--max-body-bytes", "50000", "--lfs-threshold", "1000", "--latency-ms", "200")
    with server_process(root, *options) as (process, endpoint):
        serving = f"Serving {root} at {endpoint} (HF_ENDPOINT={endpoint})\n"
        assert process.stdout.readline() == serving  # one line, however long
        api = HfApi(endpoint=endpoint, token=token)
        started = time.monotonic()
        api.create_repo("opt/repo")
        assert time.monotonic() - started >= 0.2
        modes = httpx.post(
            f"{endpoint}/api/models/opt/repo/preupload/main",
            json={"files": [{"path": "big.bin", "size": 1000}, {"path": "s.txt", "size": 999}]},
            headers={"Authorization": f"Bearer {token}"},
        ).json()["files"]
        assert [f["uploadMode"] for f in modes] == ["lfs", "regular"]
        too_big = httpx.post(
            f"{endpoint}/api/models/opt/repo/commit/main",
            content=b"x" * 50_001,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert too_big.status_code == 413


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bounded_load_16_clients_no_errors_every_byte_equal(hub_server, tmp_path):
    """16 concurrent clients, 4 per repo, 12 uploads and 12 downloads each (384 operations)."""
    tokens = {f"load{r}": hub_server.create_token(f"load{r}") for r in range(4)}
    for user, token in tokens.items():
        HfApi(token=token).create_repo(f"{user}/repo")

    def client(index: int) -> dict[str, bytes]:
        user = f"load{index % 4}"
        api = HfApi(token=tokens[user])
        written = {}
        for step in range(12):
            name = f"c{index}/f{step}.bin"
            data = os.urandom(1000 + 997 * step)
            oid = api.upload_file(
                path_or_fileobj=data, path_in_repo=name, repo_id=f"{user}/repo"
            ).oid
            path = hf_hub_download(
                f"{user}/repo", name, revision=oid, cache_dir=tmp_path / str(index)
            )
            assert Path(path).read_bytes() == data
            written[name] = data
        return written

    with _exchanges() as (sent, statuses), ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    # On the wire, not only as the client reports it (it retries 5xx and dropped connections):
    # every request got an answer, and every answer was a success.
    assert len(statuses) == len(sent) == 16 * 12 * 4
    assert set(statuses) == {200}
    for r in range(4):
        expected = {".gitattributes": None}
        for index in range(r, 16, 4):
            expected.update(results[index])
        api = HfApi()
        siblings = {s.rfilename: s.size for s in api.model_info(f"load{r}/repo").siblings}
        assert set(siblings) == set(expected)
        assert len(api.list_repo_commits(f"load{r}/repo")) == 1 + 4 * 12
        for name, data in expected.items():
            if data is not None:
                assert siblings[name] == len(data)
                url = f"{hub_server.endpoint}/load{r}/repo/resolve/main/{name}"
                assert httpx.get(url).content == data


def test_latency_injection_delays_every_request_and_requests_overlap(tmp_path):
    with HubServer(tmp_path / "hub", latency_ms=300) as hub:
        url = f"{hub.endpoint}/api/models"
        started = time.monotonic()
        httpx.get(url)
        single = time.monotonic() - started
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx.get(url).status_code, range(8)))
        together = time.monotonic() - started
    assert statuses == [200] * 8
    assert single >= 0.3
    assert together < 8 * 0.3  # in a queue they would take at least 8 x 300 ms
