"""The engine in a process of its own answers as the engine in this one does: the same frames,
the same typed errors, chats side by side, a reader that leaves, a library swap."""

import subprocess
import sys
import threading

import pytest

from quiver.app import ChatEngine, GenerationSettings, StrategySpec
from quiver.app.demo import DEMO_LIBRARY
from quiver.app.engine_process import EngineProcess
from quiver.errors import NotFoundError, QuiverError, RoutingError

pytestmark = pytest.mark.slow  # each process imports torch and loads the model: ~7 s

PER_SEQUENCE = StrategySpec("arrow", top_k=1, granularity="sequence", prompt_layers=(0,))


@pytest.fixture(scope="module")
def remote(local_registry):
    engine = EngineProcess(local_registry, DEMO_LIBRARY, threads=1)
    yield engine
    engine.close()


def _answer(engine, strategy, message="map each : bar dis fun", tokens=12):
    return list(engine.stream(message, [], strategy, GenerationSettings(tokens)))


def test_frames_and_state_are_the_engines_own(remote, engine):
    assert remote.expert_names == engine.expert_names
    assert remote.library.commit == engine.library.commit
    assert (remote.first_block, remote.describe()) == (engine.first_block, engine.describe())
    assert remote.threads == 1
    for strategy in (PER_SEQUENCE, StrategySpec("arrow", top_k=2), StrategySpec("base")):
        (text, ours), (expected, theirs) = (
            _answer(remote, strategy)[-1],
            _answer(engine, strategy)[-1],
        )
        assert text == expected and (ours.experts, ours.tokens) == (theirs.experts, theirs.tokens)
        for layer, weights in theirs.layers.items():  # one torch thread there: rounding differs
            assert ours.layers[layer] == [pytest.approx(row, abs=1e-5) for row in weights]
        assert ours.sequence == (theirs.sequence and pytest.approx(theirs.sequence, abs=1e-5))


def test_errors_arrive_typed_and_the_process_keeps_serving(remote):
    with pytest.raises(RoutingError, match="top_k=9 but the library has 4 experts"):
        _answer(remote, StrategySpec("arrow", top_k=9))
    leaving = remote.stream("map each : 1 2 3", [], StrategySpec("base"), GenerationSettings(30))
    next(leaving)
    leaving.close()  # the reader goes: the child stops that answer
    assert _answer(remote, StrategySpec("base"), tokens=3)[-1][0]


def test_two_chats_at_once_each_get_their_own_answer(remote):
    prompts = {"words": "map each : bar dis fun", "numbers": "map each : 12 40 7 33"}
    alone = {key: _answer(remote, PER_SEQUENCE, prompt)[-1] for key, prompt in prompts.items()}
    together = {}

    def chat(key: str) -> None:
        together[key] = _answer(remote, PER_SEQUENCE, prompts[key])[-1]

    threads = [threading.Thread(target=chat, args=(key,)) for key in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


def test_a_library_swap_reaches_the_state_here(remote, local_registry, random_library):
    remote.load_library(local_registry, random_library)
    assert remote.library.repo_id == random_library
    assert remote.expert_names == ChatEngine(local_registry, random_library).expert_names
    assert "ELREA" not in remote.describe()
    with pytest.raises(NotFoundError):
        remote.load_library(local_registry, "nobody/nothing")
    assert remote.library.repo_id == random_library  # the old library stays
    remote.load_library(local_registry, DEMO_LIBRARY)
    assert remote.library.repo_id == DEMO_LIBRARY


def test_a_library_that_cannot_be_opened_fails_the_start(local_registry):
    with pytest.raises(NotFoundError, match="nobody/nothing"):
        EngineProcess(local_registry, "nobody/nothing")


def test_a_script_without_a_main_guard_gets_a_typed_error(tmp_path, local_registry):
    """The child is spawned: it imports the caller's main module, which must not start another."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from quiver.app.engine_process import EngineProcess\n"
        "from quiver.registry import LocalRegistry\n"
        f"EngineProcess(LocalRegistry({str(local_registry.root)!r}), {DEMO_LIBRARY!r})\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "QuiverError: the chat's engine process stopped before its engine was up" in (
        result.stderr
    )
    assert "if __name__ == '__main__':" in result.stderr


def test_a_killed_engine_process_is_a_typed_error_not_a_hang(local_registry):
    doomed = EngineProcess(local_registry, DEMO_LIBRARY)
    doomed._process.kill()
    doomed._process.join()
    for _ in range(2):  # the reader may learn it first, or the send
        with pytest.raises(QuiverError, match="the chat's engine process has stopped"):
            _answer(doomed, StrategySpec("base"), tokens=3)


def test_a_swap_that_fails_here_is_the_callers_error_and_chats_go_on(
    remote, local_registry, random_library, monkeypatch
):
    """The new library is opened in the caller's thread, never in the pipe's reader: an error
    there (a registry that stops answering) reaches the caller, and later chats still get
    their frames."""
    from quiver.app import engine_process

    def unreachable(state):
        raise NotFoundError("the registry stopped answering")

    monkeypatch.setattr(engine_process, "_opened", unreachable)
    with pytest.raises(NotFoundError, match="stopped answering"):
        remote.load_library(local_registry, random_library)
    monkeypatch.undo()
    assert _answer(remote, StrategySpec("base"), tokens=3)[-1][0]
    remote.load_library(local_registry, DEMO_LIBRARY)
    assert remote.library.repo_id == DEMO_LIBRARY
