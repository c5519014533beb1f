"""The Hub store against our self-hosted server: the same operations, through huggingface_hub."""

import itertools
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, get_session, snapshot_download
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import ArrowConfig, create_arrow_model
from peft.utils import get_peft_model_state_dict
from registry_helpers import gsm8k_result, ia3_config, logits, store_state
from safetensors.torch import load_file

import quiver
from quiver.errors import (
    AuthenticationError,
    CardError,
    ConflictError,
    ConnectionFailedError,
    IntegrityError,
    InvalidAdapterError,
    InvalidInputError,
    NotFoundError,
)
from quiver.registry import Expert, HubRegistry, Library, open_registry
from quiver.registry.hub import endpoint_cache
from quiver.testing import make_random_expert, tiny_model

BASE = "quiver-testing/tiny-llama"
_users = (f"user{i}" for i in itertools.count())


@pytest.fixture
def user(hub_server):
    """A fresh namespace per test (the server lives for the whole session)."""
    return next(_users)


@pytest.fixture
def hub(hub_server, user, tmp_path):
    """A Hub registry for ``user`` with its own, empty Hugging Face cache."""
    token = hub_server.create_token(user)
    return HubRegistry(hub_server.endpoint, token=token, cache_dir=tmp_path / "hf-cache")


def _dead_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_open_registry_specs(hub_server, tmp_path):
    assert isinstance(open_registry(hub_server.endpoint), HubRegistry)
    assert (quiver.Expert, quiver.Library) == (Expert, Library)  # the top-level Python API
    assert open_registry("hf").endpoint == "https://huggingface.co"
    assert open_registry("HTTP://LocalHost:8000/hub/").endpoint == "http://localhost:8000/hub"
    assert open_registry(tmp_path / "store", create=True).root == tmp_path / "store"
    assert open_registry(str(tmp_path / "store")).root == tmp_path / "store"  # a store now
    assert open_registry().root == Path(os.environ["QUIVER_HOME"]) / "registry"


def test_a_mistyped_registry_is_refused_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFoundError, match=r"^no Quiver store at does-not-exist") as error:
        open_registry("./does-not-exist")
    assert "push" in error.value.hint
    (tmp_path / "a-file").write_text("not a store")
    with pytest.raises(NotFoundError, match="no Quiver store at a-file"):
        open_registry("a-file")
    for spec in ("ftp://x", "s3://bucket/store", "file:///tmp/store", "http://"):
        with pytest.raises(InvalidInputError, match="not an http"):
            open_registry(spec, create=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


def test_quiver_push_loads_with_plain_peft_with_same_logits(hub, user, make_expert, base_model):
    folder = make_expert()
    expert = Expert.from_folder(
        folder, tasks=["math"], datasets=["gsm8k"], license="mit", eval_results=[gsm8k_result()]
    )
    pushed = hub.push(expert, f"{user}/math")
    # Plain PEFT, through the global HF_ENDPOINT (our server), no quiver code involved.
    plain = PeftModel.from_pretrained(tiny_model("llama"), f"{user}/math").eval()
    reference = PeftModel.from_pretrained(tiny_model("llama"), str(folder)).eval()
    assert not logits(base_model).allclose(logits(reference))  # the expert does something
    assert logits(plain).equal(logits(reference))
    # What the Hub itself reads from the card (huggingface_hub's own parsing, no quiver code).
    info = HfApi().model_info(f"{user}/math")
    assert info.sha == pushed.commit
    assert {f"base_model:adapter:{BASE}", "peft", "task:math"} <= set(info.tags)
    assert info.card_data.base_model == BASE
    assert info.card_data.library_name == "peft"
    assert (info.card_data.datasets, info.card_data.license) == (["gsm8k"], "mit")
    assert info.card_data.eval_results[0].metric_value == 0.42
    assert info.card_data["quiver"]["tasks"] == ["math"]
    assert info.card_data["quiver"]["hashes"] == pushed.file_hashes()


def test_plain_peft_push_to_hub_is_pulled_with_completed_card(hub_server, hub, user, base_model):
    config = LoraConfig(
        r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(tiny_model("llama"), config).eval()
    model.push_to_hub(f"{user}/plain", token=hub_server.create_token(user))
    pulled = hub.pull(f"{user}/plain")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(pulled.path)).eval()
    assert not logits(model).allclose(logits(base_model))  # the adapter does something
    assert logits(loaded).equal(logits(model))
    assert (pulled.card.rank, pulled.card.alpha) == (2, 8.0)
    assert pulled.card.target_modules == ["q_proj", "v_proj"]
    assert pulled.card.base_model == BASE
    assert pulled.card.hashes == {}  # the plain card pins nothing; quiver's does
    assert [hit.repo_id for hit in hub.search(author=user)] == [f"{user}/plain"]
    # Quiver uses it: in a library (the completed card gives the geometry) and re-published.
    library = Library.create(hub, f"{user}/lib", base_model=BASE)
    library.add(f"{user}/plain")
    assert library.experts[0].sha256 == pulled.weights_sha256
    republished = hub.push(pulled, f"{user}/plain-quiver")
    assert hub.pull(f"{user}/plain-quiver").card.hashes == republished.file_hashes()
    kinds = {hit.repo_id: hit.kind for hit in hub.search(author=user, base_model=BASE)}
    assert kinds == {f"{user}/lib": "library", f"{user}/plain-quiver": "expert"}


def test_pull_by_branch_tag_and_commit(hub, user, make_expert):
    repo = f"{user}/e"
    first = hub.push(make_expert(seed=1), repo, tag="v1")
    second = hub.push(make_expert(seed=2), repo)
    dev = hub.push(make_expert(seed=3), repo, branch="dev")
    assert hub.pull(repo).weights_sha256 == second.weights_sha256
    assert hub.pull(repo, revision="v1").weights_sha256 == first.weights_sha256
    assert hub.pull(repo, revision="dev").weights_sha256 == dev.weights_sha256
    assert hub.pull(repo, revision=first.commit).commit == first.commit
    history = hub.versions(repo)
    assert [v.commit for v in history[:2]] == [second.commit, first.commit]
    assert "v1" in history[1].refs
    with pytest.raises(ConflictError, match="tags are immutable"):
        hub.tag(repo, "v1", revision=second.commit)
    with pytest.raises(ConflictError, match="'v1'"):
        hub.push(make_expert(seed=4), repo, tag="v1")
    assert hub.versions(repo)[0].commit == second.commit  # refused before anything was written
    assert hub.refs(repo) == {"main": second.commit, "dev": dev.commit, "v1": first.commit}


def test_search_filters(hub, user, make_expert):
    hub.push(Expert.from_folder(make_expert(), tasks=["math"], tags=["fast"]), f"{user}/math")
    hub.push(Expert.from_folder(make_expert(), tasks=["code"]), f"{user}/code")
    Library.create(hub, f"{user}/lib", base_model=BASE)

    def ids(**filters):
        return sorted(hit.repo_id for hit in hub.search(author=user, **filters))

    assert ids(task="math") == [f"{user}/math"]
    assert ids(tag="fast") == [f"{user}/math"]
    assert ids(base_model=BASE) == [f"{user}/code", f"{user}/lib", f"{user}/math"]
    assert ids(kind="library") == [f"{user}/lib"]
    assert ids(kind="expert") == [f"{user}/code", f"{user}/math"]
    assert ids(query="cod") == [f"{user}/code"]
    assert ids(base_model="other/model") == []
    assert hub.search(author=user, task="code")[0].tasks == ("code",)


def test_list_and_delete(hub, user, make_expert):
    hub.push(make_expert(), f"{user}/kept")
    hub.push(make_expert(), f"{user}/gone")
    Library.create(hub, f"{user}/lib", base_model=BASE)
    listed = {hit.repo_id: hit.kind for hit in hub.list(author=user)}
    assert listed == {f"{user}/kept": "expert", f"{user}/gone": "expert", f"{user}/lib": "library"}
    assert [hit.repo_id for hit in hub.list(kind="library", author=user)] == [f"{user}/lib"]
    assert len(hub.list(author=user, limit=2)) == 2
    assert {f"{user}/kept", f"{user}/lib"} <= {hit.repo_id for hit in hub.list()}
    hub.delete(f"{user}/gone")
    with pytest.raises(NotFoundError):
        hub.pull(f"{user}/gone")
    assert sorted(hit.repo_id for hit in hub.list(author=user)) == [f"{user}/kept", f"{user}/lib"]
    with pytest.raises(NotFoundError, match="no such repo"):
        hub.delete(f"{user}/gone")


def _library(registry, user, make_expert):
    """``user/lib``: ``math`` referenced (published first as ``user/math``), ``code`` bundled."""
    registry.push(Expert.from_folder(make_expert("math"), tasks=["math"]), f"{user}/math")
    library = Library.create(registry, f"{user}/lib", base_model=BASE)
    library.add(f"{user}/math")
    library.add(make_expert("code"))
    return library


def test_library_push_and_pull_on_the_hub(hub, user, make_expert):
    library = _library(hub, user, make_expert)
    pulled = Library.pull(hub, f"{user}/lib")
    assert pulled.commit == library.commit
    assert list(pulled.expert_paths()) == ["math", "code"]
    # Bundled experts load by `user/repo/experts/<name>`, as PEFT's Arrow expects.
    model = create_arrow_model(
        tiny_model("llama"),
        task_specific_adapter_paths=[f"{user}/math", f"{user}/lib/experts/code"],
        arrow_config=ArrowConfig(top_k=1),
    )
    assert logits(model).isfinite().all()
    for adapter, name in (("task_0", "math"), ("task_1", "code")):
        loaded = get_peft_model_state_dict(model, adapter_name=adapter)
        published = load_file(pulled.expert_paths()[name] / "adapter_model.safetensors")
        assert loaded.keys() == published.keys()
        assert all(loaded[key].equal(published[key]) for key in published)


def test_library_moves_from_local_store_to_hub_and_back(hub, user, local, make_expert, tmp_path):
    library = _library(local, user, make_expert)
    on_hub = library.push(hub).library
    assert on_hub.experts[0].commit == hub.pull(f"{user}/math").commit
    back = Library.pull(hub, f"{user}/lib").push(open_registry(tmp_path / "copy", create=True))
    assert [p.sha256 for p in back.library.experts] == [p.sha256 for p in library.experts]


def test_truncated_file_in_the_hf_cache_is_caught(hub, user, make_expert, local):
    _library(hub, user, make_expert)
    weights = Library.pull(hub, f"{user}/lib").expert_paths()["math"] / "adapter_model.safetensors"
    blob = weights.resolve()  # the cache's snapshot entries are symlinks to blobs
    assert blob.parent.name == "blobs"
    blob.write_bytes(blob.read_bytes()[:-10])
    before = store_state(local)
    with pytest.raises(IntegrityError, match="sha256"):
        Library.pull(hub, f"{user}/lib").push(local)
    assert store_state(local) == before  # nothing half-written lands in the local store
    # The bad file left the cache, so pulling again downloads a good copy.
    pushed = Library.pull(hub, f"{user}/lib").push(local).library
    assert list(pushed.expert_paths()) == ["math", "code"]


def test_tampered_blob_on_the_server_is_caught(hub_server, hub, user, make_expert, tmp_path):
    library = _library(hub, user, make_expert)
    code = library.experts[1]
    blob = hub_server.root / "blobs" / code.sha256[:2] / code.sha256
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        fresh = HubRegistry(hub.endpoint, token=hub.token, cache_dir=tmp_path / "fresh")
        with pytest.raises(IntegrityError, match="code"):
            Library.pull(fresh, f"{user}/lib")
    finally:
        blob.write_bytes(original)


@pytest.fixture
def sent_requests():
    """Every HTTP request huggingface_hub sends during the test, as "METHOD /path"."""
    sent = []

    def record(request):
        sent.append(f"{request.method} {request.url.path}")

    hooks = get_session().event_hooks["request"]
    hooks.append(record)
    yield sent
    hooks.remove(record)


def test_a_second_pull_is_served_from_the_hf_cache(hub, user, make_expert, sent_requests):
    library = _library(hub, user, make_expert)
    sent_requests.clear()
    Library.pull(hub, f"{user}/lib", revision=library.commit)
    assert any("/resolve/" in request for request in sent_requests)  # the first pull downloads
    sent_requests.clear()
    again = Library.pull(hub, f"{user}/lib", revision=library.commit)
    assert list(again.expert_paths()) == ["math", "code"]
    assert sent_requests == []  # pinned: not one request
    Library.pull(hub, f"{user}/lib")
    hub.pull(f"{user}/math")
    # Latest: one look-up of main per repo, and no file is downloaded again.
    assert sent_requests == [
        f"GET /api/models/{user}/lib/revision/main",
        f"GET /api/models/{user}/math/revision/main",
    ]


def test_each_endpoint_pulls_from_its_own_cache_also_offline(hub_server, user, make_expert):
    hub = HubRegistry(hub_server.endpoint, token=hub_server.create_token(user))  # default cache
    _library(hub, user, make_expert)
    Library.pull(hub, f"{user}/lib")
    expert = hub.pull(f"{user}/math")
    assert expert.path.is_relative_to(endpoint_cache(hub_server.endpoint))
    assert not expert.path.is_relative_to(constants.HF_HUB_CACHE)
    # The normal Hugging Face cache holds what plain clients fetched through HF_ENDPOINT (here,
    # this Hub): not huggingface.co's bytes, so Quiver keeps huggingface.co's apart too.
    snapshot_download(f"{user}/math")
    assert not HubRegistry("https://huggingface.co/").cache_dir.is_relative_to(
        constants.HF_HUB_CACHE
    )
    # Another endpoint has none of it cached: it must fail, not serve this Hub's copy.
    with pytest.raises(ConnectionFailedError, match="cannot reach") as error:
        HubRegistry(_dead_endpoint()).pull(f"{user}/math")
    assert error.value.repo_id == f"{user}/math"
    with pytest.raises(ConnectionFailedError, match="cannot reach"):
        Library.pull(HubRegistry(_dead_endpoint()), f"{user}/lib")
    script = textwrap.dedent(
        f"""
        from huggingface_hub import hf_hub_download
        from quiver.errors import ConnectionFailedError
        from quiver.registry import HubRegistry, Library, open_registry
        hub = HubRegistry({hub_server.endpoint!r})
        library = Library.pull(hub, "{user}/lib")
        print(list(library.expert_paths()), hub.pull("{user}/math").card.rank)
        # plain huggingface_hub finds the files in that endpoint's cache
        print(hf_hub_download("{user}/math", "adapter_model.safetensors", cache_dir=hub.cache_dir))
        try:
            open_registry("hf").pull("{user}/math")
        except ConnectionFailedError as error:
            print(error.message)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    weights = str(expert.path / "adapter_model.safetensors")
    assert result.stdout.splitlines() == [
        "['math', 'code'] 4",
        weights,
        f"pull {user}/math@main: cannot reach https://huggingface.co and the files are not in "
        "its local cache",
    ]


def test_unknown_repo_revision_and_missing_files(hub, user, make_expert, tmp_path):
    hub.push(make_expert(), f"{user}/e")
    with pytest.raises(NotFoundError, match="no such repo"):
        hub.pull(f"{user}/nope")
    with pytest.raises(NotFoundError, match="no such revision"):
        hub.pull(f"{user}/e", revision="v42")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}'
    )
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    hub.upload(f"{user}/pickled", pickled, message="a .bin adapter")
    with pytest.raises(InvalidAdapterError, match="never unpickles"):
        hub.pull(f"{user}/pickled")
    Library.create(hub, f"{user}/lib", base_model=BASE)
    with pytest.raises(
        InvalidAdapterError, match=f"^{user}/lib@[0-9a-f]{{10}} has no adapter_config"
    ):
        hub.pull(f"{user}/lib")
    with pytest.raises(NotFoundError, match="not a Quiver library"):
        Library.open(hub, f"{user}/e")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ia3_config(), "IA3"),
        (LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "DoRA"),
    ],
    ids=["ia3", "dora"],
)
def test_non_lora_adapters_pushed_by_peft_are_refused(hub_server, hub, user, config, message):
    get_peft_model(tiny_model("llama"), config).push_to_hub(
        f"{user}/odd", token=hub_server.create_token(user)
    )
    with pytest.raises(InvalidAdapterError, match=message):
        hub.pull(f"{user}/odd")
    library = Library.create(hub, f"{user}/lib", base_model=BASE)
    versions = library.versions()
    with pytest.raises(InvalidAdapterError, match=message):
        library.add(f"{user}/odd")
    assert library.versions() == versions


def test_a_referenced_expert_gone_from_the_hub_leaves_the_local_store_untouched(
    hub, user, make_expert, local, tmp_path
):
    _library(hub, user, make_expert)
    fresh = HubRegistry(hub.endpoint, cache_dir=tmp_path / "fresh")  # nothing cached yet
    opened = Library.open(fresh, f"{user}/lib")  # manifest only: experts not fetched yet
    hub.delete(f"{user}/math")
    before = store_state(local)
    with pytest.raises(NotFoundError, match=f"{user}/math"):
        opened.push(local)
    assert store_state(local) == before


def test_tokens_and_endpoints(hub_server, user, make_expert, tmp_path):
    folder = make_expert()
    endpoint = hub_server.endpoint
    with pytest.raises(AuthenticationError):
        HubRegistry(endpoint, token="hf_not_a_token").push(folder, f"{user}/e")
    with pytest.raises(AuthenticationError):
        HubRegistry(endpoint).push(folder, f"{user}/e")  # no token at all
    read_only = hub_server.create_token(user, write=False)
    with pytest.raises(AuthenticationError):
        HubRegistry(endpoint, token=read_only).push(folder, f"{user}/e")
    someone_else = hub_server.create_token(f"{user}-other")
    with pytest.raises(AuthenticationError):
        HubRegistry(endpoint, token=someone_else).push(folder, f"{user}/e")
    with pytest.raises(ConnectionFailedError):
        HubRegistry(_dead_endpoint(), token=read_only).push(folder, f"{user}/e")
    HubRegistry(endpoint, token=hub_server.create_token(user)).push(folder, f"{user}/e")
    with pytest.raises(AuthenticationError, match="refused the token") as bad_token:
        HubRegistry(endpoint, token="hf_not_a_token", cache_dir=tmp_path / "c").pull(f"{user}/e")
    assert "\n" not in str(bad_token.value)  # one line, as the CLI prints it


def test_a_library_pushed_with_a_bad_token_leaves_nothing(hub_server, user, local, make_expert):
    library = _library(local, user, make_expert)
    for token in ("hf_not_a_token", hub_server.create_token(user, write=False), None):
        with pytest.raises(AuthenticationError):
            library.push(HubRegistry(hub_server.endpoint, token=token))
    assert HubRegistry(hub_server.endpoint).list(author=user) == []


def test_concurrent_pull_of_many_bundled_experts(hub, user, base_model, tmp_path):
    library = Library.create(hub, f"{user}/bundle", base_model=BASE)
    for index in range(10):
        library.add(make_random_expert(base_model, tmp_path / f"b{index}", rank=4, seed=index))
    fresh = HubRegistry(hub.endpoint, cache_dir=tmp_path / "fresh")
    pulled = Library.pull(fresh, f"{user}/bundle", max_workers=8)
    paths = pulled.expert_paths()
    assert list(paths) == [f"b{index}" for index in range(10)]
    assert {Expert.from_folder(path).weights_sha256 for path in paths.values()} == {
        pin.sha256 for pin in library.experts
    }


def test_malformed_card_is_refused_before_and_by_the_hub(hub, user, make_expert):
    folder = make_expert()
    (folder / "README.md").write_text("---\nquiver: [tasks, 1\n---\n")
    with pytest.raises(CardError, match="malformed model card YAML"):
        hub.push(folder, f"{user}/badcard")  # quiver reads the card before any request
    with pytest.raises(CardError, match="refused the model card"):
        hub.upload(f"{user}/badcard", folder, message="raw upload, past quiver's checks")
    with pytest.raises(NotFoundError):  # the repo made for the failed first push is gone
        hub.versions(f"{user}/badcard")
    good = hub.push(make_expert(), f"{user}/goodcard")
    with pytest.raises(CardError):
        hub.upload(f"{user}/goodcard", folder, message="a broken second version")
    assert hub.versions(f"{user}/goodcard")[0].commit == good.commit
