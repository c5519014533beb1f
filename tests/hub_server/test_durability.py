"""Durability of the store: interrupted uploads leave no temp files after a restart, and the
garbage collector removes what no commit references, safely while the server writes."""

import contextlib
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import httpx
from hub_helpers import server_process
from huggingface_hub import HfApi, hf_hub_download
from typer.testing import CliRunner

from quiver.cli import app
from quiver.server import HubServer, HubStore
from quiver.store import RepoKey, RepoStore, delete_garbage, find_garbage


def _quiver(*args) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _blobs(store: RepoStore) -> set[str]:
    return {path.name for path in store.blobs.root.glob("??/*")}


def test_temp_files_of_a_killed_upload_are_removed_at_start(tmp_path):
    root = tmp_path / "hub"
    token = HubStore(root).create_token("kai", write=True)
    data = os.urandom(400_000)
    oid = hashlib.sha256(data).hexdigest()
    with server_process(root, "--lfs-threshold", "1000") as (process, endpoint):
        HfApi(endpoint=endpoint, token=token).create_repo("kai/big")
        batch = httpx.post(
            f"{endpoint}/kai/big.git/info/lfs/objects/batch",
            json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
            headers={"Authorization": f"Bearer {token}"},
        )
        url = batch.json()["objects"][0]["actions"]["upload"]["href"]

        def half_then_hang():
            yield data[:200_000]
            time.sleep(30)
            yield data[200_000:]

        def upload() -> None:
            with contextlib.suppress(httpx.TransportError):
                httpx.put(url, content=half_then_hang(), timeout=60)

        threading.Thread(target=upload, daemon=True).start()
        deadline = time.monotonic() + 30
        while not any(f.stat().st_size >= 200_000 for f in (root / "tmp").iterdir()):
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert list((root / "tmp").iterdir())  # the killed upload's half blob
    with server_process(root) as (_, endpoint):
        assert list((root / "tmp").iterdir()) == []
        assert not HubStore(root).blobs.has(oid)


def test_a_write_in_flight_keeps_its_temp_files_when_another_process_opens_the_store(tmp_path):
    store = RepoStore(tmp_path / "store")
    with store.staging(), store.blobs.writer() as blob:
        blob.write(b"half of a blob")
        RepoStore(store.root)  # another process starting meanwhile must not sweep tmp/
        assert len(list(store.blobs.tmp.iterdir())) == 1
        assert blob.finish()[1] == len(b"half of a blob")
    (store.blobs.tmp / "left-by-a-crash").write_bytes(b"x")
    RepoStore(store.root)
    assert list(store.blobs.tmp.iterdir()) == []


def test_gc_dry_run_then_delete_through_the_cli(tmp_path):
    root = tmp_path / "hub"
    with HubServer(root) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("gus"))
        for repo in ("gus/kept", "gus/doomed"):
            api.create_repo(repo)
            api.upload_file(path_or_fileobj=repo.encode(), path_in_repo="f.txt", repo_id=repo)
        hf_hub_download("gus/doomed", "f.txt", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
        doomed = hashlib.sha256(b"gus/doomed").hexdigest()
        hub.store.snapshot(
            hub.store.get_repo(RepoKey.parse("gus/doomed")), api.model_info("gus/doomed").sha
        )
        api.delete_repo("gus/doomed")
        blobs = _blobs(hub.store)

        out = _quiver("hub", "gc", "--root", root, "--min-age", "0")
        assert "Found 1 unreferenced blobs" in out and "pass --delete" in out
        assert _blobs(hub.store) == blobs
        assert "Found 0 unreferenced blobs" in _quiver("hub", "gc", "--root", root)  # too recent

        out = _quiver("hub", "gc", "--root", root, "--min-age", "0", "--delete")
        assert "Removed 1 unreferenced blobs" in out
        assert _blobs(hub.store) == blobs - {doomed}
        assert list(hub.store.snapshots.iterdir()) == []
        kept = hf_hub_download("gus/kept", "f.txt", endpoint=hub.endpoint, cache_dir=tmp_path / "d")
        assert Path(kept).read_bytes() == b"gus/kept"
        assert "Found 0 unreferenced blobs" in _quiver(
            "hub", "gc", "--root", root, "--min-age", "0"
        )


def test_gc_waits_for_a_commit_in_flight_and_keeps_its_blobs(tmp_path):
    store = RepoStore(tmp_path / "store")
    key = RepoKey.parse("ann/repo")
    with store.staging() as staging:
        store.commit_snapshot(
            key, "main", [staging.add_bytes("a", b"old")], title="a", author="ann"
        )
    store.delete_repo(key)  # b"old" is now garbage...
    garbage = find_garbage(store, min_age_s=0)
    assert len(garbage.blobs) == 1
    collected = []
    with store.staging() as staging:  # ...but a commit in flight stages it again
        entry = staging.add_bytes("a", b"old")
        collector = threading.Thread(
            target=lambda: collected.append(delete_garbage(store, garbage))
        )
        collector.start()
        collector.join(timeout=1.0)
        assert collector.is_alive()  # the collector waits for the commit to land
        store.commit_snapshot(key, "main", [entry], title="again", author="ann")
    collector.join(timeout=30)
    assert collected[0].blobs == {}
    repo = store.get_repo(key)
    assert (store.snapshot(repo, store.resolve(repo, "main")) / "a").read_bytes() == b"old"


def test_gc_spares_a_blob_written_after_it_started(tmp_path):
    store = RepoStore(tmp_path / "store")
    with store.staging() as staging:
        staging.add_bytes("orphan", b"written, never committed")
    garbage = find_garbage(store, min_age_s=0)
    time.sleep(0.01)
    with store.staging() as staging:  # the same content, written again after the scan
        staging.add_bytes("orphan", b"written, never committed")
    assert delete_garbage(store, garbage).blobs == {}
    assert len(_blobs(store)) == 1
    assert len(delete_garbage(store, find_garbage(store, min_age_s=0)).blobs) == 1
    assert _blobs(store) == set()


def test_gc_while_clients_commit_never_takes_a_blob_a_commit_needs(tmp_path):
    """A client commits, one by one, contents that the collector is collecting meanwhile."""
    contents = [f"content {i}".encode() for i in range(40)]
    with HubServer(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("rex"))
        api.create_repo("rex/doomed")
        api.upload_folder(folder_path=_folder(tmp_path / "doomed", contents), repo_id="rex/doomed")
        api.delete_repo("rex/doomed")
        api.create_repo("rex/live")

        def commit_each() -> None:
            for i, data in enumerate(contents):
                api.upload_file(path_or_fileobj=data, path_in_repo=f"{i}.txt", repo_id="rex/live")

        committer = threading.Thread(target=commit_each)
        committer.start()
        collected: set[str] = set()
        deadline = time.monotonic() + 120
        while committer.is_alive() and time.monotonic() < deadline:
            garbage = delete_garbage(hub.store, find_garbage(hub.store, min_age_s=0))
            collected |= {blob.name for blob in garbage.blobs}
        committer.join(timeout=1)
        assert not committer.is_alive()
        # The race happened: contents were collected, then committed again.
        assert hashlib.sha256(contents[-1]).hexdigest() in collected
        for i, data in enumerate(contents):
            path = hf_hub_download(
                "rex/live", f"{i}.txt", endpoint=hub.endpoint, cache_dir=tmp_path / "cache"
            )
            assert Path(path).read_bytes() == data


def _folder(root: Path, contents: list[bytes]) -> Path:
    root.mkdir()
    for i, data in enumerate(contents):
        (root / f"{i}.txt").write_bytes(data)
    return root


def test_a_commit_is_on_disk_before_it_is_acknowledged(tmp_path, monkeypatch):
    """Blobs are fsynced with their folder; SQLite commits in WAL mode with synchronous=FULL."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    with HubServer(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("dee"))
        api.create_repo("dee/repo")
        monkeypatch.setattr(os, "fsync", recording_fsync)
        api.upload_file(path_or_fileobj=b"durable", path_in_repo="d.txt", repo_id="dee/repo")
        blob = hub.store.blobs.path(hashlib.sha256(b"durable").hexdigest())
        assert str(blob.parent) in synced  # the rename that gave the blob its address
        with hub.store._connect() as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
