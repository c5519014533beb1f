"""The chat engine: the one shared model, streamed, each answer with its own routing trace; on the
library of random experts, whose answers run as long as asked (the demo's are a few words)."""

import itertools
import random
import threading
import time

import pytest
import torch
from app_helpers import RANDOM_BASE_MODEL, RANDOM_EXPERTS

from quiver.app import ChatEngine, GenerationSettings, StrategySpec
from quiver.app.engine import _Answer
from quiver.errors import InvalidInputError, NotFoundError, RoutingError
from quiver.registry import Library
from quiver.routing import Arrow, route
from quiver.routing.base_model import load_base_model
from quiver.training import TrainConfig, build_elrea_library

GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0)


def answer(engine, strategy, message="Hello there", history=(), settings=GREEDY):
    """Every update of one answer (one per token the reader wakes for: no frame pacing)."""
    return list(engine.stream(message, list(history), strategy, settings, frame_seconds=0))


@pytest.fixture(scope="module")
def engine(random_engine):
    return random_engine


@pytest.fixture(scope="module")
def reference(local_registry):
    """A second copy of the base model, to check the engine against."""
    model, tokenizer = load_base_model(local_registry, RANDOM_BASE_MODEL)
    return model, tokenizer


def test_the_answer_streams_and_is_the_routed_models_own(engine, reference):
    updates = answer(engine, StrategySpec("arrow", top_k=2))

    *partial, (text, routing) = updates
    assert len(partial) > 1 and all(r is None for _, r in partial)
    texts = [t for t, _ in updates]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))

    model, tokenizer = reference
    routed = route(model, engine.library, Arrow(top_k=2))
    try:
        ids, _ = engine.prompt_ids("Hello there", [], GREEDY.max_new_tokens)
        generated = routed.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )[0, ids.shape[1] :]
        assert text == tokenizer.decode(generated, skip_special_tokens=True)
        assert list(routing.tokens) == [tokenizer.decode([t]) for t in generated]

        # Column t is the routing of the forward that produced token t: replay the whole answer
        # in one teacher-forced forward and read the positions from the last prompt token on.
        with routed.trace() as trace:
            routed(torch.cat([ids[0], generated[:-1]])[None])
        expected = trace.layer_weights()
    finally:
        routed.unroute()
    first = ids.shape[1] - 1
    assert routing.experts == tuple(RANDOM_EXPERTS)
    assert sorted(routing.layers) == sorted(expected)
    for layer, weights in routing.layers.items():
        replayed = expected[layer][0, first : first + len(generated)]
        torch.testing.assert_close(torch.tensor(weights), replayed, atol=1e-4, rtol=1e-4)
    mean = torch.tensor(routing.mean())
    torch.testing.assert_close(mean.sum(-1), torch.ones(len(generated)))


def test_one_expert_gets_all_the_weight(engine):
    _, routing = answer(engine, StrategySpec("single", expert="cobalt"))[-1]

    one_hot = torch.zeros(len(RANDOM_EXPERTS))
    one_hot[RANDOM_EXPERTS.index("cobalt")] = 1
    for weights in routing.layers.values():
        assert torch.equal(torch.tensor(weights), one_hot.expand(len(routing.tokens), -1))


def test_arrow_per_sequence_keeps_the_prompts_choice_for_the_whole_answer(engine, reference):
    strategy = StrategySpec("arrow", top_k=2, temperature=0.5, granularity="sequence")
    text, routing = answer(engine, strategy)[-1]

    model, tokenizer = reference
    routed = route(model, engine.library, Arrow(top_k=2, temperature=0.5, granularity="sequence"))
    try:
        ids, _ = engine.prompt_ids("Hello there", [], GREEDY.max_new_tokens)
        choice = routed.choose_experts(ids)
        options = dict(max_new_tokens=GREEDY.max_new_tokens, do_sample=False, pad_token_id=0)
        generated = routed.generate(ids, attention_mask=torch.ones_like(ids), **options)
    finally:
        routed.unroute()
    assert text == tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    chosen = torch.zeros(len(RANDOM_EXPERTS)).index_put_((choice.index[0],), choice.weights[0])
    assert (chosen > 0).sum() == 2
    torch.testing.assert_close(torch.tensor(routing.sequence), chosen)
    for weights in routing.layers.values():  # every token used the prompt's choice
        torch.testing.assert_close(torch.tensor(weights), chosen.expand(len(routing.tokens), -1))


@pytest.fixture(scope="module")
def elrea_library(local_registry, random_library):
    """An ELREA library (a base adapter and two experts, a few steps each) on the random Llama,
    built from prompts of two kinds: sums of digits and lowercase words to reverse."""
    rng = random.Random(0)
    pairs = []
    for _ in range(12):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        word = "".join(rng.choice("abcdefghij") for _ in range(6))
        pairs += [(f"sum {a} {b} =", str(a + b)), (f"reverse {word}:", word[::-1])]
    base, tokenizer = load_base_model(local_registry, RANDOM_BASE_MODEL)
    fast = TrainConfig(rank=4, dropout=0.0, learning_rate=1e-2, max_steps=12, batch_size=8)
    return build_elrea_library(
        pairs, local_registry, "acme/elrea", base_model=base, tokenizer=tokenizer, k=2,
        config=fast, projection_dim=256, progress=False,
    ).repo_id  # fmt: skip


@pytest.mark.slow  # builds an ELREA library: three short trainings and a gradient pass
def test_elrea_weighs_each_prompt_once_for_the_whole_answer(local_registry, elrea_library):
    engine = ChatEngine(local_registry, elrea_library)
    text, routing = answer(engine, StrategySpec("elrea", top_k=2, temperature=0.5))[-1]

    model, tokenizer = load_base_model(local_registry, RANDOM_BASE_MODEL)
    routed = route(model, engine.library, "elrea", top_k=2, temperature=0.5)
    ids, _ = engine.prompt_ids("Hello there", [], GREEDY.max_new_tokens)
    options = dict(max_new_tokens=GREEDY.max_new_tokens, do_sample=False, pad_token_id=0)
    generated = routed.generate(ids, attention_mask=torch.ones_like(ids), **options)
    assert text == tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    assert routing.experts == tuple(engine.library.names)  # the base adapter and the experts
    sequence = torch.tensor(routing.sequence)
    assert (sequence > 0).sum() == 2
    torch.testing.assert_close(sequence.sum(), torch.tensor(1.0))
    for weights in routing.layers.values():  # every token used the prompt's ensemble
        torch.testing.assert_close(torch.tensor(weights), sequence.expand(len(routing.tokens), -1))


def test_the_base_model_answers_unrouted(engine, reference):
    text, routing = answer(engine, StrategySpec("base"))[-1]

    assert routing.layers == {} and routing.experts == ()
    model, tokenizer = reference
    ids, _ = engine.prompt_ids("Hello there", [], GREEDY.max_new_tokens)
    generated = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False
    )
    assert text == tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)


def test_switching_strategies_back_and_forth_changes_nothing(engine):
    strategies = [
        StrategySpec("arrow", top_k=3, mixing="parameters"),
        StrategySpec("uniform"),
        StrategySpec("single", expert="amber"),
        StrategySpec("base"),
    ]
    first = [answer(engine, s)[-1] for s in strategies]
    again = [answer(engine, s)[-1] for s in reversed(strategies)][::-1]

    assert [text for text, _ in first] == [text for text, _ in again]
    assert [r.layers for _, r in first] == [r.layers for _, r in again]


def test_two_chats_at_once_run_side_by_side_each_with_its_own_answer_and_trace(engine):
    long = GenerationSettings(max_new_tokens=160)
    arrow, single = StrategySpec("arrow", top_k=2), StrategySpec("single", expert="dune")
    strategies = (arrow, single, StrategySpec("arrow", top_k=3, granularity="sequence"))
    alone = [answer(engine, s, f"about {s.name}", settings=long)[-1] for s in strategies]

    together, times = {}, {}
    start = threading.Barrier(len(strategies))

    def chat(index, strategy):
        start.wait(timeout=60)
        updates, times[index] = [], []
        for update in engine.stream(f"about {strategy.name}", [], strategy, long, frame_seconds=0):
            times[index].append(time.monotonic())
            updates.append(update)
        together[index] = updates[-1]

    threads = [threading.Thread(target=chat, args=item) for item in enumerate(strategies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    for index, (text, routing) in together.items():
        assert text == alone[index][0]
        assert routing == alone[index][1]
    assert together[2][1].sequence is not None and together[0][1].sequence is None
    # They ran at once: every chat had tokens streaming before every other chat was done.
    for mine, other in itertools.permutations(times.values(), 2):
        assert mine[0] < other[-1]
        assert any(other[0] < t < other[-1] for t in mine)


def test_a_reader_that_leaves_stops_the_answer(engine, monkeypatch):
    long = GenerationSettings(200)
    assert len(answer(engine, StrategySpec("arrow"), settings=long)[-1][1].tokens) == 200
    produced = []
    put = _Answer.put
    monkeypatch.setattr(_Answer, "put", lambda answer, v: (produced.append(v), put(answer, v)))

    stream = engine.stream("Hello there", [], StrategySpec("arrow"), long)
    next(stream)
    stream.close()  # the page was closed mid-answer

    with engine._turns.swap():  # waits until the worker has let go of the model
        assert len(produced) < 100  # it stopped soon after, far from its 200 tokens


def test_history_is_trimmed_to_the_context_and_a_long_prompt_refused(engine):
    long_turn = "x" * 200
    history = [
        {"role": role, "content": long_turn} for _ in range(10) for role in ("user", "assistant")
    ]
    ids, room = engine.prompt_ids("Hi", history, 64)
    assert ids.shape[1] + 64 <= engine.context_length
    assert room == 64
    assert answer(engine, StrategySpec("base"), history=history)[-1][0] is not None

    with pytest.raises(InvalidInputError, match="reads at most 512"):
        engine.prompt_ids("y" * 600, [], 16)
    with pytest.raises(InvalidInputError, match="empty"):
        engine.prompt_ids("   ", [], 16)


def test_gradio_message_parts_are_read_as_text(engine):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    plain = [{"role": "user", "content": "hello"}]
    assert torch.equal(engine.prompt_ids("x", parts, 8)[0], engine.prompt_ids("x", plain, 8)[0])


def test_bad_strategies_and_settings_are_refused():
    with pytest.raises(InvalidInputError, match="unknown strategy"):
        StrategySpec("moe")
    with pytest.raises(InvalidInputError, match="needs an expert"):
        StrategySpec("single")
    with pytest.raises(InvalidInputError, match="unknown mixing"):
        StrategySpec(mixing="both")
    with pytest.raises(InvalidInputError, match="unknown granularity 'word'"):
        StrategySpec(granularity="word")
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(InvalidInputError, match="top_p"):
        GenerationSettings(top_p=0)


def test_routing_errors_reach_the_reader(engine):
    with pytest.raises(RoutingError, match="top_k=9 but the library has 4 experts"):
        answer(engine, StrategySpec("arrow", top_k=9))
    with pytest.raises(RoutingError, match="unknown expert 'nobody'"):
        answer(engine, StrategySpec("single", expert="nobody"))
    assert answer(engine, StrategySpec("arrow"))[-1][1].layers  # still serving


def test_swapping_libraries(local_registry, random_library, hub_server):
    """(hub_server: the Hub that HF_ENDPOINT names answers "no such model" at once.)"""
    engine = ChatEngine(local_registry, random_library)
    model = engine.model
    Library.create(local_registry, "acme/empty-chat", base_model=RANDOM_BASE_MODEL)
    long = GenerationSettings(max_new_tokens=120)
    uninterrupted = answer(engine, StrategySpec("arrow"), settings=long)[-1]

    running = engine.stream("Hello there", [], StrategySpec("arrow"), long, frame_seconds=0)
    next(running)
    swap = threading.Thread(target=engine.load_library, args=(local_registry, "acme/empty-chat"))
    swap.start()
    text, routing = list(running)[-1]  # the running chat ends on the library it started with
    swap.join(timeout=60)

    assert (text, routing) == uninterrupted
    assert all(len(weights) == 120 for weights in routing.layers.values())
    assert engine.library.repo_id == "acme/empty-chat"
    assert engine.model is model  # same base model: kept
    with pytest.raises(RoutingError, match="has no experts"):
        answer(engine, StrategySpec("arrow"))
    assert answer(engine, StrategySpec("base"))[-1][1].layers == {}

    Library.create(local_registry, "acme/elsewhere", base_model="acme/not-a-model")
    with pytest.raises(NotFoundError, match="acme/not-a-model"):
        engine.load_library(local_registry, "acme/elsewhere")
    assert engine.library.repo_id == "acme/empty-chat"  # the old model came back
    assert answer(engine, StrategySpec("base"))[-1][0] is not None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"temperature": float("nan")}, "temperature must be >= 0 and finite"),
        ({"temperature": float("inf")}, "temperature must be >= 0 and finite"),
        ({"top_p": "1"}, "top_p must be in"),
    ],
)
def test_settings_of_the_wrong_type_are_refused(settings, message):
    """The chat API takes any JSON: these reached generate() (or sampled at an infinite
    temperature) before."""
    with pytest.raises(InvalidInputError, match=message):
        GenerationSettings(**settings)


@pytest.mark.parametrize(
    ("message", "history", "expected"),
    [
        (None, [], "the message is empty"),  # AttributeError before
        ("hi", [{"role": "user"}], "history entry 0 is not a"),  # KeyError before
        ("hi", [{"role": "robot", "content": "x"}], "history entry 0 is not a"),
        ("hi", ["hello"], "history entry 0 is not a"),
    ],
)
def test_a_malformed_message_or_history_is_refused(engine, message, history, expected):
    with pytest.raises(InvalidInputError, match=expected):
        engine.prompt_ids(message, history, 8)
