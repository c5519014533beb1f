"""Many experts in one call: the local and Ray backends, failures, pushing from the workers."""

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from training_helpers import FAST, pairs

from quiver.errors import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidInputError,
    TrainingError,
)
from quiver.registry import Library, LocalRegistry, open_registry
from quiver.training import train_experts


def _free_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DATA = {
    "upper": pairs("upper"),
    "reverse": pairs("reverse"),
    "cluster": {"double": pairs("double"), "upper": pairs("upper")[:4]},
}


def test_local_backend_trains_each_expert_and_reports_a_failure(model, tokenizer, tmp_path):
    registry = LocalRegistry(tmp_path / "store")
    Library.create(registry, "me/reverse", base_model=model.name_or_path)  # not an expert repo
    results = train_experts(
        model, DATA, config=FAST, tokenizer=tokenizer, registry=registry, namespace="me"
    )
    assert [r.name for r in results] == ["upper", "reverse", "cluster"]
    upper, reverse, cluster = results
    assert upper.ok and cluster.ok and not reverse.ok
    assert "me/reverse" in reverse.error and "library" in reverse.error
    with pytest.raises(TrainingError, match="'reverse' failed"):
        reverse.expert  # noqa: B018
    assert upper.expert.card.tasks == ["upper"]
    assert cluster.expert.card.tasks == ["double", "upper"]
    assert cluster.expert.card.examples == 14
    assert registry.pull("me/cluster").weights_sha256 == cluster.sha256


@pytest.mark.slow  # Ray takes ~10-30 s to start
def test_ray_gives_the_same_experts_as_local_and_workers_push(
    local_ray, hub_server, model, tokenizer, tmp_path
):
    hub = open_registry(hub_server.endpoint, token=hub_server.create_token("ray", write=True))
    local = train_experts(model, DATA, config=FAST, tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "base")  # workers load the base model by path
    tokenizer.save_pretrained(tmp_path / "base")
    # Three experts on two workers: one worker trains two from the base model it loaded once.
    remote = train_experts(
        tmp_path / "base", DATA, config=FAST, backend="ray", registry=hub, namespace="ray"
    )
    assert all(r.ok for r in local + remote), [r.error for r in local + remote]
    assert [r.sha256 for r in remote] == [r.sha256 for r in local]
    assert [r.repo_id for r in remote] == ["ray/upper", "ray/reverse", "ray/cluster"]
    pulled = hub.pull("ray/cluster", revision=remote[2].commit)
    assert pulled.weights_sha256 == local[2].sha256
    assert pulled.card.tasks == ["double", "upper"]
    # A loaded model travels through the object store; the workers drop the last call's base.
    shipped = train_experts(model, DATA, config=FAST, tokenizer=tokenizer, backend="ray")
    assert [r.sha256 for r in shipped] == [r.sha256 for r in local]


def test_bad_input_is_refused_before_any_training(model, tokenizer, tmp_path):
    with pytest.raises(TrainingError, match="expert 'empty': data holds no examples"):
        train_experts(
            model,
            {"upper": pairs("upper"), "empty": []},
            tokenizer=tokenizer,
            output_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(TrainingError, match="unknown backend"):
        train_experts(model, DATA, tokenizer=tokenizer, backend="dask")
    with pytest.raises(TrainingError, match="share no filesystem"):
        train_experts(model, DATA, tokenizer=tokenizer, backend="ray", address="10.0.0.1:6379")
    with pytest.raises(TrainingError, match="namespace"):
        train_experts(model, DATA, tokenizer=tokenizer, registry=LocalRegistry(tmp_path / "r"))


@pytest.mark.parametrize(
    ("data", "options", "error", "message"),
    [
        ({"a/b": pairs("upper")}, {}, InvalidInputError, "invalid expert name 'a/b'"),
        ({"..": pairs("upper")}, {}, InvalidInputError, "invalid expert name '..'"),
        ([pairs("upper")], {}, TrainingError, "map each expert's name"),
        (DATA, {"eval_data": {"uper": pairs("upper")}}, TrainingError, "not trained: uper"),
        (DATA, {"namespace": "bad space"}, InvalidInputError, "invalid repo id 'bad space/upper'"),
        (DATA, {"namespace": "me", "dead": True}, ConnectionFailedError, "cannot reach"),
        (DATA, {"taken": True}, TrainingError, "upper is a folder that is not empty"),
    ],
)
def test_names_targets_and_folders_are_checked_before_any_training(
    model, tokenizer, tmp_path, monkeypatch, data, options, error, message
):
    """Each fails at once, naming what to fix: not after training, not per expert, and never
    writing into a folder that holds other files (an expert named '..' wrote to the parent)."""
    import quiver.training.fanout as fanout

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the request was checked")

    monkeypatch.setattr(fanout, "train_prepared", no_training)
    if options.pop("taken", False):
        (tmp_path / "out" / "upper").mkdir(parents=True)
        (tmp_path / "out" / "upper" / "README.md").write_text("someone's notes")
    if "namespace" in options:
        dead = options.pop("dead", False)
        live = LocalRegistry(tmp_path / "store")
        options["registry"] = (
            open_registry(f"http://127.0.0.1:{_free_port()}", token="hf_" + "0" * 40)
            if dead
            else live
        )
    with pytest.raises(error, match=message):
        train_experts(model, data, tokenizer=tokenizer, output_dir=tmp_path / "out", **options)


def test_an_unreachable_ray_cluster_is_a_typed_error(model, tokenizer, tmp_path):
    port = _free_port()
    with pytest.raises(
        ConnectionFailedError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"
    ):
        train_experts(
            model,
            DATA,
            config=FAST,
            tokenizer=tokenizer,
            backend="ray",
            address=f"127.0.0.1:{port}",
            registry=LocalRegistry(tmp_path / "r"),
            namespace="n",
        )


def test_a_local_ray_is_not_started_from_a_side_thread(model, tokenizer, monkeypatch):
    """Ray's processes die with the thread that started them: a side thread that ends would
    take the run's Ray with it, so the call is refused up front."""
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            train_experts, model, DATA, config=FAST, tokenizer=tokenizer, backend="ray"
        )
        with pytest.raises(TrainingError, match="must be started from the main thread"):
            call.result()


def test_pushing_into_a_namespace_the_token_may_not_write_fails_before_training(
    model, tokenizer, hub_server, tmp_path, monkeypatch
):
    """On a `quiver hub serve`, bob's token may not write alice's namespace, nor a read-only token
    its own: the training ran to the end, then every push was refused."""
    import quiver.training.build as build
    import quiver.training.fanout as fanout

    def no_work(*args, **kwargs):
        raise AssertionError("worked before checking where the results go")

    monkeypatch.setattr(fanout, "train_prepared", no_work)
    monkeypatch.setattr(build, "cluster_experts", no_work)
    bob = open_registry(hub_server.endpoint, token=hub_server.create_token("bob"))
    reader = open_registry(hub_server.endpoint, token=hub_server.create_token("rob", write=False))
    anonymous = open_registry(hub_server.endpoint, token=False)
    data = {"upper": pairs("upper")}
    for registry, namespace, message in (
        (bob, "alice", "bob .* may not push to alice/upper \\(not its namespace alice\\)"),
        (reader, "rob", "rob .* may not push to rob/upper \\(it is read-only\\)"),
        (anonymous, "anon", "needs a token"),
    ):
        with pytest.raises(AuthenticationError, match=message):
            train_experts(model, data, tokenizer=tokenizer, registry=registry, namespace=namespace)
    experts = {"a": tmp_path / "a", "b": tmp_path / "b"}
    with pytest.raises(AuthenticationError, match="may not push to alice/mbc"):
        build.build_mbc_library(experts, bob, "alice/mbc", k=2)
    open_registry(hub_server.endpoint, token=hub_server.create_token("bob")).check_can_push(
        "bob/mine"
    )  # its own namespace: fine
