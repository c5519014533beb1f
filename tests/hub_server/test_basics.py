"""The core round trip of the unmodified huggingface_hub client against the self-hosted Hub."""

import hashlib
import os
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


@pytest.fixture
def api(hub_server):
    return HfApi(token=hub_server.create_token("alice"))


def test_fixture_serves_the_global_endpoint(hub_server):
    assert hub_server.endpoint == os.environ["HF_ENDPOINT"]
    assert hub_server.root.is_dir()


def test_create_upload_info_download(api, tmp_path):
    url = api.create_repo("alice/basics")
    assert url.repo_id == "alice/basics"
    info = api.upload_file(
        path_or_fileobj=b"hello hub", path_in_repo="greeting.txt", repo_id="alice/basics"
    )
    model = api.model_info("alice/basics")
    assert model.sha == info.oid
    assert {s.rfilename for s in model.siblings} == {".gitattributes", "greeting.txt"}
    path = hf_hub_download("alice/basics", "greeting.txt", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"hello hub"


def test_missing_repo_and_file_are_typed(api, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/nothing-here")
    api.create_repo("alice/sparse")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/sparse", "missing.txt", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/sparse", ".gitattributes", revision="nope", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nothing-here", "f.txt", cache_dir=tmp_path)


def test_empty_and_unicode_named_files_round_trip(api, tmp_path):
    api.create_repo("alice/edge")
    api.upload_file(path_or_fileobj=b"", path_in_repo="empty.txt", repo_id="alice/edge")
    api.upload_file(path_or_fileobj=b"hi", path_in_repo="dir w/ü ñ.txt", repo_id="alice/edge")
    empty = hf_hub_download("alice/edge", "empty.txt", cache_dir=tmp_path)
    named = hf_hub_download("alice/edge", "dir w/ü ñ.txt", cache_dir=tmp_path)
    assert (Path(empty).read_bytes(), Path(named).read_bytes()) == (b"", b"hi")


def test_contents_are_stored_once_under_their_sha256(api, hub_server):
    data = os.urandom(3000)
    for repo in ("alice/copy-a", "alice/copy-b"):
        api.create_repo(repo)
        for name in ("same.bin", "again/same.bin"):
            api.upload_file(path_or_fileobj=data, path_in_repo=name, repo_id=repo)
    blobs = hub_server.store.blobs
    copies = [p for p in blobs.root.rglob("*") if p.is_file() and p.read_bytes() == data]
    assert copies == [blobs.path(hashlib.sha256(data).hexdigest())]
