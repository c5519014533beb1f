"""The embedded default: the toy world's demo library, installed once, offline; routed, its chat
sends a prompt to the expert of the prompt's cluster and answers it right."""

import pytest

from quiver.app import ChatEngine, GenerationSettings, StrategySpec
from quiver.app.chat_tab import _advised
from quiver.app.demo import (
    DEMO_BASE_MODEL,
    DEMO_ELREA_LIBRARY,
    DEMO_LIBRARY,
    DEMO_PROMPTS,
    ensure_demo_library,
)
from quiver.app.engine import advice
from quiver.errors import RoutingError
from quiver.registry import Library, LocalRegistry
from quiver.routing.arrow import ARTIFACT_NAME
from quiver.toyworld import DEMO_FOLDER, DOMAINS
from quiver.toyworld.demo import DEMO_REPOS
from quiver.toyworld.pipeline import task_owners

WORDS = "bar dis fun"


def test_installed_once_with_experts_prototypes_and_base_model(tmp_path):
    registry = LocalRegistry(tmp_path / "store")

    assert ensure_demo_library(registry) == DEMO_LIBRARY
    versions = len(registry.versions(DEMO_LIBRARY))
    assert ensure_demo_library(registry) == DEMO_LIBRARY
    assert len(registry.versions(DEMO_LIBRARY)) == versions  # the second call wrote nothing

    library = Library.open(registry, DEMO_LIBRARY)
    assert len(library.names) == 4
    assert library.manifest.base_model == DEMO_BASE_MODEL
    assert ARTIFACT_NAME in library.manifest.artifacts
    folder, _ = registry.download(DEMO_BASE_MODEL)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def answer(engine, strategy: StrategySpec, message: str):
    return list(engine.stream(message, [], strategy, GenerationSettings(12)))[-1]


def test_arrow_per_sequence_sends_a_words_prompt_to_the_words_expert(engine):
    expected = " ".join(DOMAINS["words"].map(word) for word in WORDS.split())
    words_expert = task_owners(engine.library)["words-each"]
    message = f"map each : {WORDS}"

    text, routing = answer(engine, StrategySpec("arrow", top_k=1, granularity="sequence"), message)

    assert text == expected
    assert dict(zip(routing.experts, routing.sequence, strict=True))[words_expert] == 1.0
    assert answer(engine, StrategySpec("base"), message)[0] != expected  # the expert knows it


def test_the_demo_advises_the_first_block_which_routes_every_offered_prompt_right(engine):
    """The demo library's routing advice, which the Chat tab starts from: Arrow per sequence
    with the prompt scored at the first block; there, each prompt the tab offers goes to the
    expert of its cluster."""
    arrow = {"granularity": "sequence", "prompt_layers": [0], "top_k": 1}
    assert advice(engine.library, "arrow") == arrow
    assert engine.first_block == 0
    assert _advised(engine) == {"top_k": 1, "granularity": "sequence", "prompt_scope": "first"}
    owners = task_owners(engine.library)
    tasks = ["words-each", "symbols-last", "numbers-each", "letters-ends"]  # DEMO_PROMPTS' tasks
    first_block = StrategySpec("arrow", top_k=1, granularity="sequence", prompt_layers=(0,))
    for prompt, task in zip(DEMO_PROMPTS, tasks, strict=True):
        _, routing = answer(engine, first_block, prompt)
        weights = dict(zip(routing.experts, routing.sequence, strict=True))
        assert weights[owners[task]] == 1.0, prompt


def test_a_library_without_advice_starts_top_2_per_sequence_at_every_block(random_engine):
    assert advice(random_engine.library, "arrow") == {}
    assert _advised(random_engine) == {"top_k": 2, "granularity": "sequence", "prompt_scope": "all"}
    assert random_engine.elrea is None and "ELREA" not in random_engine.describe()


def test_advice_naming_an_elrea_library_of_another_base_model_leaves_the_chat_up(
    local_registry, random_library, engine
):
    """Advice is the library author's: when it cannot be followed the library still chats, and
    ELREA chats say why they cannot run."""
    experts = Library.open(local_registry, random_library).names
    library = Library.create(
        local_registry,
        "quiver-test/advised",
        base_model=Library.open(local_registry, random_library).manifest.base_model,
        experts={name: f"quiver-test/{name}" for name in experts},
    )
    library.set_routing({"elrea": {"library": DEMO_ELREA_LIBRARY}})
    advised = ChatEngine(local_registry, library.repo_id)

    assert answer(advised, StrategySpec("arrow", top_k=1), "Hello")[0]
    assert "is built on quiver-demo/toyworld-base, not on" in advised.describe()
    with pytest.raises(RoutingError, match=r"no ELREA chats with quiver-test/advised: .* built on"):
        answer(advised, StrategySpec("elrea", top_k=1), "Hello")


def test_elrea_on_the_default_routes_over_the_demos_elrea_library(engine):
    expected = " ".join(DOMAINS["words"].map(word) for word in WORDS.split())
    elrea = Library.open(engine.registry, DEMO_ELREA_LIBRARY)

    text, routing = answer(engine, StrategySpec("elrea", top_k=1), f"map each : {WORDS}")

    assert text == expected
    assert set(routing.experts) == set(elrea.names)  # not the MBC library's experts
    assert sorted(routing.sequence)[-1] == 1.0  # top-1: one member answers the whole prompt
    assert engine.expert_names == Library.open(engine.registry, DEMO_LIBRARY).names
    assert DEMO_ELREA_LIBRARY in engine.describe()


def test_a_registry_with_an_older_demo_chats_but_elrea_says_what_is_missing(tmp_path):
    registry = LocalRegistry(tmp_path / "store")
    for name in ("base", "library"):  # the demo before it shipped its ELREA library
        repo_id = DEMO_REPOS[name]
        registry.upload(repo_id, DEMO_FOLDER / name, message=f"Install {repo_id}")
    engine = ChatEngine(registry, DEMO_LIBRARY)

    assert answer(engine, StrategySpec("base"), f"map each : {WORDS}")[0]
    assert "quiver-demo/toyworld-elrea', is not in" in engine.describe()
    with pytest.raises(RoutingError, match="toyworld-elrea', is not in"):
        answer(engine, StrategySpec("elrea", top_k=1), f"map each : {WORDS}")
