"""The app served on 127.0.0.1, driven through gradio_client as any API user would; chatting with
the library of random experts (long answers) in the session's local store."""

import itertools
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from app_helpers import RANDOM_BASE_MODEL, RANDOM_EXPERTS, RANDOM_LIBRARY
from gradio_client import Client
from gradio_client.exceptions import AppError

from quiver.app import GenerationSettings, StrategySpec
from quiver.registry import Expert, Library
from quiver.testing import make_random_expert, tiny_model

TIMEOUT = 120  # seconds any one call may take on a loaded machine


@pytest.fixture(scope="module")
def engine(random_engine):
    return random_engine


@pytest.fixture(scope="module")
def client(app):
    return Client(app.local_url, verbose=False)


def chat(client, message="Hello", *options, **named):
    """All the updates of one /chat call: [answer so far, routing or None]."""
    job = client.submit(message, *options, api_name="/chat", **named)
    job.result(timeout=TIMEOUT)
    return job.outputs()


def test_chat_streams_the_answer_then_its_routing(client, engine):
    updates = chat(client, "Hello", "arrow", 2, max_new_tokens=24)

    *partial, (text, routing) = updates
    assert partial and all(r is None for _, r in partial)
    assert [t for t, _ in partial] == sorted((t for t, _ in partial), key=len)
    strategy, settings = StrategySpec("arrow", top_k=2), GenerationSettings(24)
    expected_text, expected = list(engine.stream("Hello", [], strategy, settings))[-1]
    assert text == expected_text
    assert routing == expected.to_dict()
    assert routing["experts"] == list(RANDOM_EXPERTS)
    assert len(routing["mean"]) == len(routing["tokens"]) == 24
    torch.testing.assert_close(torch.tensor(routing["mean"]).sum(-1), torch.ones(24))


def test_predict_returns_the_final_answer(client):
    text, routing = client.predict("Hi", "single", expert="birch", api_name="/chat")

    assert isinstance(text, str)
    assert all(row == [0.0, 1.0, 0.0, 0.0] for row in routing["mean"])


def test_chats_at_once_run_side_by_side_each_with_its_own_answer_and_routing(client):
    """Two chats with different strategies (the app's queue runs two at a time): the answers and
    routings each would get alone, streamed at the same time (updates of each arrive while the
    other is streaming)."""
    asked = {"arrow": dict(top_k=2), "single": dict(expert="dune")}

    def run(strategy):
        job = client.submit(
            "Same prompt", strategy, max_new_tokens=160, api_name="/chat", **asked[strategy]
        )
        arrivals = [time.monotonic() for _ in job]
        return job.outputs()[-1], arrivals

    alone = {strategy: run(strategy)[0] for strategy in asked}
    with ThreadPoolExecutor(len(asked)) as pool:
        together = dict(zip(asked, pool.map(run, asked), strict=True))

    for strategy, (final, _) in together.items():
        assert final == alone[strategy]
    dune = RANDOM_EXPERTS.index("dune")
    assert all(row[dune] == 1.0 for row in together["single"][0][1]["mean"])
    assert any(row[dune] < 1.0 for row in together["arrow"][0][1]["mean"])
    for (_, mine), (_, other) in itertools.permutations(together.values(), 2):
        assert len(mine) > 3
        assert any(other[0] < arrival < other[-1] for arrival in mine)


def test_arrow_per_sequence_routes_the_whole_answer_once(client):
    _, routing = client.predict(
        "Hello", "arrow", 2, 0.5, granularity="sequence", max_new_tokens=16, api_name="/chat"
    )

    sequence = torch.tensor(routing["sequence"])
    assert (sequence > 0).sum() == 2
    torch.testing.assert_close(sequence.sum(), torch.tensor(1.0))
    torch.testing.assert_close(torch.tensor(routing["mean"]), sequence.expand(16, -1))
    _, per_token = client.predict("Hello", "arrow", 2, 0.5, max_new_tokens=16, api_name="/chat")
    assert per_token["sequence"] is None


def test_arrow_per_sequence_scores_the_prompt_at_the_blocks_asked(client):
    ask = dict(granularity="sequence", max_new_tokens=4, api_name="/chat")
    _, every = client.predict("Hello", "arrow", 2, 0.5, **ask)
    _, first = client.predict("Hello", "arrow", 2, 0.5, prompt_layers=[0], **ask)

    assert first["sequence"] != every["sequence"]  # block 0's scores alone choose otherwise
    with pytest.raises(AppError, match=r"no routed module lies in prompt_layers \[99\]"):
        client.predict("Hello", "arrow", 2, 0.5, prompt_layers=[99], **ask)


def test_search_card_and_pull(client):
    results, choices = client.predict("", "", "", "random", "", "", "expert", api_name="/search")

    repos = [row[0] for row in results["data"]]
    assert sorted(repos) == sorted(f"quiver-test/{name}" for name in RANDOM_EXPERTS)
    assert sorted(choice[0] for choice in choices["choices"]) == sorted(repos)

    libraries, _ = client.predict("", "", "", "", "", "random", "library", api_name="/search")
    assert [row[0] for row in libraries["data"]] == [RANDOM_LIBRARY]

    card = client.predict("", "", "quiver-test/amber", api_name="/card")
    assert "**Tasks**: random" in card and "rank 4" in card

    card, files = client.predict("", "", "quiver-test/amber", api_name="/pull")
    assert "Pulled and verified" in card
    names = {row[0]: row[1] for row in files["data"]}
    assert set(names) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert names["adapter_model.safetensors"].endswith("KiB")


def test_compose_prototypes_and_chat_with_the_new_library(client, engine):
    chosen = ["quiver-test/cobalt", "quiver-test/amber"]
    repo, where, summary, experts, _, clusters = client.predict(
        "acme/duo", "local store", "a pair", chosen, "", "", api_name="/compose"
    )
    assert repo == "acme/duo" and "2 experts" in summary
    assert [row[0] for row in experts["data"]] == ["cobalt", "amber"]
    assert clusters["data"] == [["cluster-0", "cobalt, amber"]]  # 2 experts: 1 cluster suggested

    summary = client.predict(repo, where, "", "", api_name="/store_prototypes")
    assert "arrow_prototypes" in summary

    _, _, experts, similarity, _ = client.predict(repo, "", "", api_name="/open_library")
    assert similarity is not None and len(experts["data"]) == 2
    similarity, clusters = client.predict(repo, where, "", "", 2, api_name="/cluster")
    assert similarity is not None
    assert clusters["data"] == [["cluster-0", "cobalt"], ["cluster-1", "amber"]]

    try:
        info, *_ = client.predict(repo, where, "", "", api_name="/use_library")
        assert "acme/duo" in info
        _, routing = client.predict("Hello", api_name="/chat")
        assert routing["experts"] == ["cobalt", "amber"]
    finally:
        client.predict(RANDOM_LIBRARY, where, "", "", api_name="/use_library")
    assert engine.library.repo_id == RANDOM_LIBRARY


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_space_keeps_visitors_out_of_its_disk(client, local_registry, monkeypatch, tmp_path):
    monkeypatch.setenv("SPACE_ID", "acme/quiver")
    search = ("", "", "", "", "expert")  # base model, task, tag, text, kind

    with pytest.raises(AppError, match="is a folder, and this app runs on a shared Space"):
        client.predict(str(tmp_path), "", *search, api_name="/search")
    assert not any(tmp_path.iterdir())  # nothing was created there
    assert client.predict(local_registry.location, "", *search, api_name="/search")[0]["data"]


def test_errors_come_back_as_readable_messages(client, local_registry, hub_server, tmp_path):
    def refused(*args, api_name):
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name=api_name)
        return str(caught.value)

    dead = f"http://127.0.0.1:{_closed_port()}"
    assert "cannot reach" in refused(dead, "", "quiver-test/amber", api_name="/pull")
    push = (RANDOM_LIBRARY, "", "", "", hub_server.endpoint, "hf_not_a_token", "")
    assert "refused the token" in refused(*push, api_name="/push_library")
    assert "reads at most 512" in refused("x" * 600, api_name="/chat")
    assert "top_k=7 but the library has 4 experts" in refused("Hi", "arrow", 7, api_name="/chat")
    assert "no repo 'acme/nothing'" in refused("acme/nothing", "", "", api_name="/open_library")

    other_base = tiny_model("llama", hidden=48)
    other_base.name_or_path = "acme/other-base"
    misfit = make_random_expert(other_base, tmp_path / "misfit", rank=4)
    local_registry.push(Expert.from_folder(misfit), "acme/unfit")
    chosen = ["quiver-test/amber", "acme/unfit"]
    compose = ("acme/bad", "local store", "", chosen, "", "")
    assert "has base model 'acme/other-base'" in refused(*compose, api_name="/compose")
    compose = ("acme/none", "local store", "", [], "", "")
    assert "no experts chosen" in refused(*compose, api_name="/compose")

    Library.create(local_registry, "acme/empty", base_model=RANDOM_BASE_MODEL)
    try:
        client.predict("acme/empty", "", "", "", api_name="/use_library")
        assert "acme/empty has no experts" in refused("Hi", api_name="/chat")
        assert client.predict("Hi", "base", api_name="/chat")[1]["layers"] == {}
    finally:
        client.predict(RANDOM_LIBRARY, "", "", "", api_name="/use_library")
