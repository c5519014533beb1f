"""Who may read and write what: anonymous public reads, namespace-owning write tokens, orgs, and
private repos that are invisible (RepoNotFound) to everyone else."""

from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from quiver.errors import AlreadyExistsError


@pytest.fixture(scope="module")
def owner(hub_server):
    return HfApi(token=hub_server.create_token("olga", orgs=("lab",)))


@pytest.fixture(scope="module")
def stranger(hub_server):
    return HfApi(token=hub_server.create_token("sam"))


@pytest.fixture(scope="module")
def anonymous():
    return HfApi(token=False)


def _status(error: pytest.ExceptionInfo) -> int:
    return error.value.response.status_code


def test_public_reads_are_anonymous_and_writes_need_the_owner(owner, stranger, anonymous, tmp_path):
    owner.create_repo("olga/public")
    owner.upload_file(path_or_fileobj=b"open", path_in_repo="f.txt", repo_id="olga/public")

    assert anonymous.model_info("olga/public").sha == owner.model_info("olga/public").sha
    path = hf_hub_download("olga/public", "f.txt", cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == b"open"

    with pytest.raises(HfHubHTTPError) as no_token:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="g.txt", repo_id="olga/public")
    assert _status(no_token) == 401
    with pytest.raises(HfHubHTTPError) as not_owner:
        stranger.upload_file(path_or_fileobj=b"x", path_in_repo="g.txt", repo_id="olga/public")
    assert _status(not_owner) == 403
    with pytest.raises(HfHubHTTPError) as foreign_namespace:
        stranger.create_repo("olga/squatted")
    assert _status(foreign_namespace) == 403
    with pytest.raises(HfHubHTTPError) as not_owner_delete:
        stranger.delete_repo("olga/public")
    assert _status(not_owner_delete) == 403
    assert [s.rfilename for s in anonymous.model_info("olga/public").siblings] == [
        ".gitattributes",
        "f.txt",
    ]


def test_read_only_token_cannot_write(hub_server):
    reader = HfApi(token=hub_server.create_token("rita", write=False))
    assert reader.whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as refused:
        reader.create_repo("rita/anything")
    assert _status(refused) == 403


def test_org_members_write_to_the_org(owner, stranger):
    assert [org["name"] for org in owner.whoami()["orgs"]] == ["lab"]
    owner.create_repo("lab/shared")
    owner.upload_file(path_or_fileobj=b"team", path_in_repo="t.txt", repo_id="lab/shared")
    with pytest.raises(HfHubHTTPError) as outsider:
        stranger.upload_file(path_or_fileobj=b"x", path_in_repo="t.txt", repo_id="lab/shared")
    assert _status(outsider) == 403


def test_a_name_is_a_user_or_an_org_never_both(hub_server, owner):
    owner.create_repo("lab/org-owned", exist_ok=True)
    owner.create_repo("olga/personal", exist_ok=True)
    with pytest.raises(AlreadyExistsError, match="'lab' is an organization"):
        hub_server.create_token("lab")
    with pytest.raises(AlreadyExistsError, match="'olga' is a user"):
        hub_server.create_token("eve", orgs=("olga",))
    with pytest.raises(AlreadyExistsError, match="'self' is a user"):
        hub_server.create_token("self", orgs=("self",))
    # Nothing was half-created: eve has no membership, no way into olga's namespace.
    member = HfApi(token=hub_server.create_token("eve"))
    assert member.whoami()["orgs"] == []
    with pytest.raises(HfHubHTTPError) as refused:
        member.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="olga/personal")
    assert _status(refused) == 403


def test_private_repos_are_invisible_to_others(owner, stranger, anonymous, tmp_path):
    owner.create_repo("olga/secret", private=True)
    owner.upload_file(path_or_fileobj=b"hidden", path_in_repo="s.txt", repo_id="olga/secret")
    assert owner.model_info("olga/secret").private is True
    mine = hf_hub_download("olga/secret", "s.txt", cache_dir=tmp_path / "own", token=owner.token)
    assert Path(mine).read_bytes() == b"hidden"
    assert "olga/secret" in [m.id for m in owner.list_models(author="olga")]

    for api, token in ((stranger, stranger.token), (anonymous, False)):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("olga/secret")
        with pytest.raises(RepositoryNotFoundError):
            list(api.list_repo_tree("olga/secret"))
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("olga/secret", "s.txt", cache_dir=tmp_path, token=token)
        assert not api.repo_exists("olga/secret")
        assert not api.file_exists("olga/secret", "s.txt")
        assert "olga/secret" not in [m.id for m in api.list_models(author="olga")]
        # Writes say "not found" too: a 401/403 would tell that the repo exists.
        with pytest.raises(RepositoryNotFoundError):
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="olga/secret")
    with pytest.raises(RepositoryNotFoundError):
        stranger.delete_repo("olga/secret")
    assert owner.model_info("olga/secret").siblings[-1].rfilename == "s.txt"

    owner.update_repo_settings("olga/secret", private=False)
    assert anonymous.model_info("olga/secret").private is False


def test_private_org_repos_are_visible_to_members_only(hub_server, owner, stranger):
    owner.create_repo("lab/private", private=True)
    reader = HfApi(token=hub_server.create_token("reed", write=False, orgs=("lab",)))
    assert reader.model_info("lab/private").private is True
    with pytest.raises(HfHubHTTPError) as read_only:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="lab/private")
    assert _status(read_only) == 403
    with pytest.raises(RepositoryNotFoundError):
        stranger.model_info("lab/private")
    assert "lab/private" not in [m.id for m in stranger.list_models(author="lab")]


def test_invalid_token_is_refused_not_mistaken_for_a_missing_repo(hub_server, owner):
    owner.create_repo("olga/checked", exist_ok=True)
    response = httpx.get(
        f"{hub_server.endpoint}/api/models/olga/checked",
        headers={"Authorization": "Bearer hf_not_a_real_token"},
    )
    assert response.status_code == 401
    assert "X-Error-Code" not in response.headers
    assert response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(token="hf_not_a_real_token").model_info("olga/checked")
    assert not isinstance(refused.value, RepositoryNotFoundError)
