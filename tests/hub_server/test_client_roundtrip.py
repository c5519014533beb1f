"""Every model-repo call of the unmodified huggingface_hub client, against the self-hosted Hub."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    RepoFile,
    RepoFolder,
    file_exists,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from quiver.server import HubServer
from quiver.store import git_blob_sha1


@pytest.fixture(scope="module")
def token(hub_server):
    return hub_server.create_token("carol")


@pytest.fixture(scope="module")
def api(token):
    return HfApi(token=token)


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_history_of_folder_uploads_deletes_tags_and_branches(api, tmp_path):
    repo = "carol/history"
    api.create_repo(repo)
    first = api.upload_folder(
        folder_path=_write_folder(tmp_path / "v1", {"a.txt": b"one", "sub/b.bin": b"\x00\x01"}),
        repo_id=repo,
        commit_message="first",
    )
    second = api.upload_folder(
        folder_path=_write_folder(tmp_path / "v2", {"a.txt": b"two", "sub/deep/c.txt": b"c"}),
        repo_id=repo,
        commit_message="second",
    )
    third = api.delete_file("sub/b.bin", repo_id=repo, commit_message="drop b")
    # preupload reports each remote file's git oid, so an unchanged upload makes no commit.
    unchanged = api.upload_folder(folder_path=tmp_path / "v2", repo_id=repo, commit_message="same")
    assert unchanged.oid == third.oid
    with pytest.raises(EntryNotFoundError):
        api.delete_file("sub/b.bin", repo_id=repo)  # already gone: refused, no empty commit
    api.create_tag(repo, tag="v1", revision=first.oid)
    api.create_branch(repo, branch="dev", revision=second.oid)

    commits = api.list_repo_commits(repo)
    assert [c.title for c in commits] == ["drop b", "second", "first", "initial commit"]
    assert [c.commit_id for c in commits[:3]] == [third.oid, second.oid, first.oid]
    assert commits[0].authors == ["carol"]

    refs = api.list_repo_refs(repo)
    assert {b.name: b.target_commit for b in refs.branches} == {
        "main": third.oid,
        "dev": second.oid,
    }
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first.oid}

    def files_at(revision):
        return sorted(s.rfilename for s in api.model_info(repo, revision=revision).siblings)

    assert files_at("v1") == [".gitattributes", "a.txt", "sub/b.bin"]
    assert files_at("dev") == [".gitattributes", "a.txt", "sub/b.bin", "sub/deep/c.txt"]
    assert files_at(third.oid) == [".gitattributes", "a.txt", "sub/deep/c.txt"]
    assert api.model_info(repo, revision="v1").sha == first.oid
    # Every commit stays addressable by sha: the old bytes come back at the old commit.
    old = hf_hub_download(repo, "a.txt", revision=first.oid, cache_dir=tmp_path / "c")
    new = hf_hub_download(repo, "a.txt", cache_dir=tmp_path / "c")
    assert (Path(old).read_bytes(), Path(new).read_bytes()) == (b"one", b"two")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="no-such-branch")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_tag(repo, tag="v1", revision="main")
    assert conflict.value.response.status_code == 409
    # A tag never moves with a commit; refs go only through explicit calls.
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, revision="v1")
    api.upload_file(path_or_fileobj=b"on dev", path_in_repo="dev.txt", repo_id=repo, revision="dev")
    assert api.model_info(repo).sha == third.oid
    # A ref named like a commit sha would shadow that commit: refused, the commit stays reachable.
    for kind in ("branch", "tag"):
        create = getattr(api, f"create_{kind}")
        with pytest.raises(HfHubHTTPError, match="looks like a commit sha") as shadowing:
            create(repo, **{kind: first.oid}, revision="main")
        assert shadowing.value.response.status_code == 400
    assert api.model_info(repo, revision=first.oid).sha == first.oid
    api.delete_tag(repo, tag="v1")
    api.delete_branch(repo, branch="dev")
    refs = api.list_repo_refs(repo)
    assert ([b.name for b in refs.branches], refs.tags) == (["main"], [])
    assert api.model_info(repo, revision=first.oid).sha == first.oid  # commits outlive their refs


def test_tree_and_paths_info_report_sizes_and_git_oids(api):
    repo = "carol/tree"
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=b"x" * 10, path_in_repo="w/x.bin", repo_id=repo)
    api.upload_file(path_or_fileobj=b"top", path_in_repo="top.txt", repo_id=repo)

    top = {e.path: e for e in api.list_repo_tree(repo)}
    assert set(top) == {".gitattributes", "top.txt", "w"}
    assert isinstance(top["w"], RepoFolder)
    assert top["top.txt"].size == 3
    assert top["top.txt"].blob_id == git_blob_sha1(b"top")
    nested = list(api.list_repo_tree(repo, path_in_repo="w"))
    assert [(e.path, e.size) for e in nested] == [("w/x.bin", 10)]
    every = {e.path for e in api.list_repo_tree(repo, recursive=True) if isinstance(e, RepoFile)}
    assert every == {".gitattributes", "top.txt", "w/x.bin"}
    assert sorted(api.list_repo_files(repo)) == sorted(every)

    info = api.get_paths_info(repo, ["top.txt", "w", "missing"])
    assert [type(e).__name__ for e in info] == ["RepoFile", "RepoFolder"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo, path_in_repo="nowhere"))

    api.delete_folder("w", repo_id=repo)
    assert sorted(api.list_repo_files(repo)) == [".gitattributes", "top.txt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_folder("w", repo_id=repo)


def test_resolve_sends_etag_commit_and_honours_range(api, hub_server):
    repo = "carol/ranges"
    api.create_repo(repo)
    data = bytes(range(256)) * 4
    commit = api.upload_file(path_or_fileobj=data, path_in_repo="data.bin", repo_id=repo)
    url = f"{hub_server.endpoint}/{repo}/resolve/main/data.bin"

    head = httpx.head(url)
    assert head.headers["X-Repo-Commit"] == commit.oid
    assert head.headers["ETag"].strip('"') == git_blob_sha1(data)
    assert int(head.headers["Content-Length"]) == len(data)
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    missing = httpx.head(f"{hub_server.endpoint}/{repo}/resolve/main/nope.bin")
    assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert missing.headers["X-Repo-Commit"] == commit.oid
    assert file_exists(repo, "data.bin") and not file_exists(repo, "nope.bin")


def test_snapshot_download_then_offline(api, tmp_path):
    repo = "carol/snapshot"
    api.create_repo(repo)
    files = {"config.json": b'{"a": 1}', "weights/w.safetensors": os.urandom(4096)}
    api.upload_folder(folder_path=_write_folder(tmp_path / "src", files), repo_id=repo)
    cache = tmp_path / "cache"

    folder = Path(snapshot_download(repo, cache_dir=cache))
    for name, data in files.items():
        assert (folder / name).read_bytes() == data

    offline = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from huggingface_hub import snapshot_download;"
            "print(snapshot_download(sys.argv[1], cache_dir=sys.argv[2]))",
            repo,
            str(cache),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip()) == folder


def test_model_card_yaml_becomes_card_data_and_filterable_tags(api, token):
    repo = "carol/carded"
    api.create_repo(repo)
    data = ModelCardData(
        base_model="tiny/llama", library_name="peft", license="mit", tags=["lora", "math"]
    )
    card = ModelCard.from_template(data, model_id="carded")
    card.push_to_hub(repo, token=token)

    loaded = ModelCard.load(repo, token=token)
    assert loaded.data.base_model == "tiny/llama"
    assert "math" in loaded.data.tags
    info = api.model_info(repo)
    assert info.card_data["license"] == "mit"
    assert {"lora", "math", "peft", "license:mit", "base_model:adapter:tiny/llama"} <= set(
        info.tags
    )
    found = [m.id for m in api.list_models(filter=["math", "license:mit"], author="carol")]
    assert found == [repo]
    assert [m.id for m in api.list_models(filter="math", search="CARDED")] == [repo]
    assert list(api.list_models(filter=["math", "license:apache-2.0"])) == []
    with_card = next(iter(api.list_models(search="carol/carded", cardData=True)))
    assert with_card.card_data["base_model"] == "tiny/llama"
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\n- [broken\n---\n", path_in_repo="README.md", repo_id=repo
        )


def test_listings_follow_link_pagination(tmp_path):
    with HubServer(tmp_path / "hub", page_size=2) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("pager"))
        names = [f"pager/m{i}" for i in range(5)]
        for name in names:
            api.create_repo(name)
        first_page = httpx.get(f"{hub.endpoint}/api/models", params={"author": "pager"})
        assert len(first_page.json()) == 2 and 'rel="next"' in first_page.headers["Link"]
        assert sorted(m.id for m in api.list_models(author="pager")) == names
        assert len(list(api.list_models(author="pager", limit=3))) == 3
        assert [m.id for m in api.list_models(search="m3")] == ["pager/m3"]

        for i in range(4):
            api.upload_file(path_or_fileobj=b"%d" % i, path_in_repo=f"d/f{i}.txt", repo_id=names[0])
        for listing in ("commits/main", "tree/main?recursive=true"):
            page = httpx.get(f"{hub.endpoint}/api/models/{names[0]}/{listing}")
            assert len(page.json()) == 2 and 'rel="next"' in page.headers["Link"]
        titles = [c.title for c in api.list_repo_commits(names[0])]
        assert titles == [f"Upload d/f{i}.txt with huggingface_hub" for i in (3, 2, 1, 0)] + [
            "initial commit"
        ]
        files = [e.path for e in api.list_repo_tree(names[0], recursive=True)]
        assert sorted(files) == [".gitattributes", "d"] + [f"d/f{i}.txt" for i in range(4)]


def test_list_models_sorts_newest_first_as_the_hub_does(hub_server):
    api = HfApi(token=hub_server.create_token("sorter"))
    for name in ("sorter/first", "sorter/second", "sorter/third"):
        api.create_repo(name)
        time.sleep(0.01)  # distinct millisecond timestamps
    api.upload_file(path_or_fileobj=b"touched", path_in_repo="t.txt", repo_id="sorter/first")

    def ids(sort: str, **kwargs) -> list[str]:
        return [m.id for m in api.list_models(author="sorter", sort=sort, **kwargs)]

    assert ids("created_at") == ["sorter/third", "sorter/second", "sorter/first"]
    assert ids("last_modified") == ["sorter/first", "sorter/third", "sorter/second"]
    expanded = list(api.list_models(author="sorter", sort="created_at", expand=["createdAt"]))
    assert [m.id for m in expanded] == ids("created_at")
    assert expanded[0].created_at > expanded[-1].created_at and expanded[0].siblings is None


def test_delete_repo_and_exist_ok(api):
    repo = "carol/doomed"
    api.create_repo(repo)
    assert api.create_repo(repo, exist_ok=True).repo_id == repo
    with pytest.raises(HfHubHTTPError):
        api.create_repo(repo)
    api.delete_repo(repo)
    assert not api.repo_exists(repo)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo)
    api.delete_repo(repo, missing_ok=True)


_UPLOAD_WITHOUT_XET = """
import sys
from huggingface_hub import HfApi, constants
assert constants.HF_HUB_DISABLE_XET
endpoint, token, weights = sys.argv[1:]
api = HfApi(endpoint=endpoint, token=token)
api.create_repo("dora/big")
api.upload_file(path_or_fileobj=weights, path_in_repo="w.safetensors", repo_id="dora/big")
api.upload_file(path_or_fileobj=b"small", path_in_repo="small.txt", repo_id="dora/big")
"""


def test_legacy_lfs_transfer_with_xet_disabled(tmp_path):
    """A client run with HF_HUB_DISABLE_XET=1 uploads big files through the LFS batch + PUT."""
    weights = os.urandom(5000)
    (tmp_path / "w.safetensors").write_bytes(weights)
    with HubServer(tmp_path / "hub", lfs_threshold=1024) as hub:
        token = hub.create_token("dora")
        upload = subprocess.run(
            [
                sys.executable,
                "-c",
                _UPLOAD_WITHOUT_XET,
                hub.endpoint,
                token,
                tmp_path / "w.safetensors",
            ],
            env={**os.environ, "HF_HUB_DISABLE_XET": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert upload.returncode == 0, upload.stderr
        api = HfApi(endpoint=hub.endpoint)
        sibling = {s.rfilename: s for s in api.model_info("dora/big").siblings}
        assert sibling["w.safetensors"].lfs.size == len(weights)
        assert sibling["small.txt"].lfs is None
        head = httpx.head(f"{hub.endpoint}/dora/big/resolve/main/w.safetensors")
        assert head.headers["ETag"].strip('"') == sibling["w.safetensors"].lfs.sha256
        path = hf_hub_download(
            "dora/big", "w.safetensors", cache_dir=tmp_path / "c", endpoint=hub.endpoint
        )
        assert Path(path).read_bytes() == weights


def test_dataset_repos_use_their_own_prefix(api, tmp_path):
    repo = "carol/table"
    api.create_repo(repo, repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="t.csv", repo_id=repo, repo_type="dataset"
    )
    assert [d.id for d in api.list_datasets(author="carol")] == [repo]
    assert not api.repo_exists(repo)  # as a model it does not exist
    path = hf_hub_download(repo, "t.csv", repo_type="dataset", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"a,b\n1,2\n"


def test_cli_token_works_against_running_server(hub_server):
    from typer.testing import CliRunner

    from quiver.cli import app

    create = ["hub", "token", "create", "erin", "--root", str(hub_server.root), "--write"]
    result = CliRunner().invoke(app, [*create, "--org", "erin-lab", "--org", "erin-team"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    whoami = HfApi(token=token).whoami()
    assert (whoami["name"], [o["name"] for o in whoami["orgs"]]) == (
        "erin",
        ["erin-lab", "erin-team"],
    )
    HfApi(token=token).create_repo("erin/from-cli")
    HfApi(token=token).create_repo("erin-team/from-cli")

    revoke = ["hub", "token", "revoke", token, "--root", str(hub_server.root)]
    assert CliRunner().invoke(app, revoke).exit_code == 0
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(token=token).create_repo("erin/after-revoke")
    assert refused.value.response.status_code == 401
    again = CliRunner().invoke(app, revoke)
    assert (again.exit_code, again.stderr.count("\n")) == (1, 1)  # one line: no such token
    assert again.stderr.startswith("error: ") and "token" in again.stderr
