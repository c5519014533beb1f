"""The chat's engine in a process of its own, so that the model's thread never waits for the
GIL behind Gradio's threads: with the engine in Gradio's process the app streamed 1.11-1.47x
slower than the engine alone, with it here 0.95-1.14x (``benchmarks/app_process.py``).

``EngineProcess`` offers what the app's tabs use of a ``ChatEngine`` (``stream``,
``load_library``, ``library``, ``expert_names``, ``first_block``, ``describe``); the engine, and
the one copy of the model, live in a spawned child. Each call is a message over a pipe; a reader
thread hands each answer's frames to the call that asked for it, so chats run side by side as
they do in one process. An error in the child reaches the caller as the same ``QuiverError``
type with the same text.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from quiver import errors
from quiver.app.engine import ChatEngine, GenerationSettings, StrategySpec, TokenRouting
from quiver.errors import QuiverError
from quiver.registry import Library, Registry

_DONE = object()


def _stopped() -> QuiverError:
    return QuiverError(
        "the chat's engine process has stopped",
        hint="restart the app; its log says why the process ended",
    )


def _portable(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)


def _rebuilt(name: str, text: str) -> Exception:
    """A child's error as the caller sees it: the QuiverError of that name, or a RuntimeError."""
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, QuiverError):
        return kind(text)
    return RuntimeError(f"{name}: {text}")


class EngineProcess:
    """A ``ChatEngine`` for ``library_id`` of ``registry``, run in a child process with
    ``threads`` torch threads (default: torch's own choice) and ``ChatEngine``'s options."""

    def __init__(
        self,
        registry: Registry,
        library_id: str,
        *,
        threads: int | None = None,
        **engine_options: Any,
    ) -> None:
        context = multiprocessing.get_context("spawn")  # no copy of a parent's threads or CUDA
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve,
            args=(child, registry, library_id, threads, engine_options),
            daemon=True,
        )
        self._process.start()
        child.close()
        self._sending = threading.Lock()
        self._calls: dict[int, queue.Queue] = {}
        self._ids = itertools.count()
        try:
            kind, payload = self._connection.recv()  # once the child's engine is up
        except EOFError as error:  # it died first: e.g. it re-ran an unguarded main module
            raise QuiverError(
                "the chat's engine process stopped before its engine was up",
                hint="start the app under `if __name__ == '__main__':` (the engine's process "
                "is spawned and imports your main module); see the messages above",
            ) from error
        if kind == "error":
            self._process.join(timeout=10)
            raise _rebuilt(*payload)
        self._state = _opened(payload)
        threading.Thread(target=self._read, name="engine-process-reader", daemon=True).start()

    # -- what the tabs read ---------------------------------------------------------------------
    @property
    def library(self) -> Library:
        return self._state["library"]

    @property
    def registry(self) -> Registry:
        return self.library.registry

    @property
    def expert_names(self) -> list[str]:
        return self.library.names

    @property
    def first_block(self) -> int:
        return self._state["first_block"]

    @property
    def threads(self) -> int:
        """The torch threads the model runs on, in its process."""
        return self._state["threads"]

    def describe(self) -> str:
        return self._state["describe"]

    # -- calls ----------------------------------------------------------------------------------
    def stream(
        self,
        message: str,
        history: Sequence[dict],
        strategy: StrategySpec,
        settings: GenerationSettings,
    ) -> Iterator[tuple[str, TokenRouting | None]]:
        """``ChatEngine.stream``, answered in the child; closing the iterator stops the answer."""
        call = self._call("stream", message, list(history), strategy, settings)
        return self._frames(call)

    def load_library(self, registry: Registry, library_id: str) -> None:
        """``ChatEngine.load_library`` in the child; the state here follows once it is done."""
        for state in self._frames(self._call("load_library", registry, library_id)):
            self._state = _opened(state)  # here, not in the reader: its errors are this call's

    def close(self) -> None:
        """Stop the child (it also stops when this process ends)."""
        if self._process.is_alive():
            with self._sending:
                self._connection.send(None)
            self._process.join(timeout=10)

    # -- the pipe -------------------------------------------------------------------------------
    def _call(self, kind: str, *args: Any) -> int:
        call = next(self._ids)
        self._calls[call] = queue.Queue()
        try:
            with self._sending:
                self._connection.send((call, kind, args))
        except OSError as error:  # the child is gone (killed, out of memory)
            self._calls.pop(call, None)
            raise _stopped() from error
        return call

    def _frames(self, call: int) -> Iterator[Any]:
        answers, item = self._calls[call], None
        try:
            while (item := answers.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._calls.pop(call, None)
            if item is not _DONE:  # the reader left early: stop the answer
                with self._sending:
                    self._connection.send((call, "leave", ()))

    def _read(self) -> None:
        """Hand each message of the child to its call: a frame (or a swap's new state), the
        end, an error."""
        while True:
            try:
                call, kind, payload = self._connection.recv()
            except Exception:  # the child is gone (or garbled the pipe): every waiting call learns
                for answers in list(self._calls.values()):
                    answers.put(_stopped())
                return
            answers = self._calls.get(call)
            if answers is None:
                continue  # a call whose reader left
            if kind == "frame":
                answers.put(payload)
            elif kind == "error":
                answers.put(_rebuilt(*payload))
            else:  # "done"
                answers.put(_DONE)


def _opened(state: tuple) -> dict[str, Any]:
    """The child's state, with the library opened here (manifest, card and artifacts)."""
    registry, library_id, commit, first_block, description, threads = state
    library = Library.open(registry, library_id, revision=commit)
    return {
        "library": library,
        "first_block": first_block,
        "describe": description,
        "threads": threads,
    }


def _state(engine: ChatEngine) -> tuple:
    library = engine.library
    return (
        engine.registry,
        library.repo_id,
        library.commit,
        engine.first_block,
        engine.describe(),
        torch.get_num_threads(),
    )


def _serve(
    connection, registry: Registry, library_id: str, threads: int | None, options: dict
) -> None:
    """The child: one ``ChatEngine``; each call runs in a thread of its own."""
    if threads is not None:
        torch.set_num_threads(threads)
    sending = threading.Lock()

    def send(message: tuple) -> None:
        with sending:
            connection.send(message)

    try:
        engine = ChatEngine(registry, library_id, **options)
    except Exception as error:
        connection.send(("error", _portable(error)))
        return
    connection.send(("state", _state(engine)))
    leaving: dict[int, threading.Event] = {}

    def run(call: int, kind: str, args: tuple) -> None:
        try:
            if kind == "stream":
                answer = engine.stream(*args)
                try:
                    for frame in answer:
                        if leaving[call].is_set():
                            break
                        send((call, "frame", frame))
                finally:
                    answer.close()  # stops the answer when its reader left
            else:  # "load_library"
                engine.load_library(*args)
                send((call, "frame", _state(engine)))
            send((call, "done", None))
        except Exception as error:
            send((call, "error", _portable(error)))
        finally:
            leaving.pop(call, None)

    while (message := connection.recv()) is not None:
        call, kind, args = message
        if kind == "leave":
            if call in leaving:
                leaving[call].set()
            continue
        leaving[call] = threading.Event()
        threading.Thread(target=run, args=(call, kind, args), daemon=True).start()


Engine = ChatEngine | EngineProcess  # what the app's tabs chat with
