"""One store, two doors: a folder the local registry wrote is served by `quiver hub serve`, and a
folder the server was pushed to is read by the local registry."""

import pytest
from hub_helpers import server_process
from huggingface_hub import HfApi, snapshot_download
from peft import PeftModel

from quiver.errors import NotFoundError
from quiver.registry import Expert, HubRegistry, LocalRegistry
from quiver.server import HubServer
from quiver.testing import make_random_expert, tiny_model


@pytest.fixture(scope="module")
def base_model():
    return tiny_model("llama", seed=0)


def test_quiver_hub_serve_serves_a_local_registry_folder(tmp_path, base_model):
    root = tmp_path / "registry"
    local = LocalRegistry(root)
    folder = make_random_expert(base_model, tmp_path / "math", rank=4, seed=1)
    first = local.push(Expert.from_folder(folder, tasks=["math"]), "alice/math", tag="v1")
    second = local.push(make_random_expert(base_model, tmp_path / "m2", seed=2), "alice/math")

    with server_process(root) as (_, endpoint):
        api = HfApi(endpoint=endpoint, token=False)
        info = api.model_info("alice/math")
        assert info.sha == second.commit
        assert {s.rfilename for s in info.siblings} == {
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        }
        refs = api.list_repo_refs("alice/math")
        assert {t.name: t.target_commit for t in refs.tags} == {"v1": first.commit}
        assert [c.commit_id for c in api.list_repo_commits("alice/math")] == [
            second.commit,
            first.commit,
        ]
        assert [m.id for m in api.list_models(filter="task:math")] == []  # main moved on
        assert [m.id for m in api.list_models(author="alice")] == ["alice/math"]
        pulled = snapshot_download(
            "alice/math", revision="v1", endpoint=endpoint, cache_dir=tmp_path / "cache"
        )
        model = PeftModel.from_pretrained(tiny_model("llama", seed=0), pulled)
        assert model.active_adapter == "default"
        served = HubRegistry(endpoint, cache_dir=tmp_path / "cache2").pull(
            "alice/math", revision="v1"
        )
        assert served.weights_sha256 == first.weights_sha256


def test_local_registry_reads_what_was_pushed_through_the_server(tmp_path, base_model):
    root = tmp_path / "hub"
    folder = make_random_expert(base_model, tmp_path / "code", rank=4, seed=3)
    with HubServer(root) as server:
        token = server.create_token("bob")
        hub = HubRegistry(server.endpoint, token=token, cache_dir=tmp_path / "cache")
        pushed = hub.push(Expert.from_folder(folder, tasks=["code"]), "bob/code", tag="v1")
        HfApi(endpoint=server.endpoint, token=token).create_repo("bob/secret", private=True)

        local = LocalRegistry(root)  # read while the server serves: one SQLite file, WAL
        pulled = local.pull("bob/code", revision="v1")
        assert (pulled.commit, pulled.weights_sha256) == (pushed.commit, pushed.weights_sha256)
        assert pulled.card.tasks == ["code"]
        assert [hit.repo_id for hit in local.search(task="code")] == ["bob/code"]
        history = local.versions("bob/code")
        assert [v.message for v in history][-1] == "initial commit"  # the server's .gitattributes
        assert history[0].refs == ("main", "v1")
        assert ".gitattributes" in {p.name for p in local.download("bob/code")[0].iterdir()}
        assert {hit.repo_id for hit in local.list()} == {"bob/code", "bob/secret"}

        local.push(make_random_expert(base_model, tmp_path / "c2", seed=4), "bob/code")
        assert (
            HfApi(endpoint=server.endpoint).model_info("bob/code").sha
            == local.refs("bob/code")["main"]
        )
    with pytest.raises(NotFoundError, match="no repo 'bob/nothing'"):
        LocalRegistry(root).pull("bob/nothing")
