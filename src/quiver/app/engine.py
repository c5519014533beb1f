"""The one model in memory, shared by every session: every chat goes through ``ChatEngine.stream``.

The base model is routed once over the library (``quiver.route``, adding nothing by itself), and
each chat runs its own strategy on it through ``routed.using(...)`` with its own trace: chats run
side by side (as many as the app's queue lets in) without waiting for each other. Only a library
swap waits for the running chats and has the model alone.

An answer is generated in a worker thread and read in the caller's: the worker only appends each
new token id (``generate``'s streamer); the reader wakes once per frame, decodes the ids that came
since the last frame and yields the text so far; the routing is read from the trace once, at the
end.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from quiver.errors import InvalidInputError, NotFoundError, QuiverError, RoutingError
from quiver.registry import Library, Registry
from quiver.routing import RoutedModel, RoutingTrace, route
from quiver.routing.base_model import load_base_model
from quiver.routing.trace import layer_of

STRATEGIES = {
    "arrow": "Arrow",
    "elrea": "ELREA",
    "uniform": "Uniform merge",
    "single": "One expert",
    "base": "Base model",
}
# The StrategySpec fields each strategy passes to ``routed.using(name, **options)``: a strategy
# that routing adds needs a line here and in STRATEGIES (and its label), nothing else.
STRATEGY_OPTIONS = {
    "arrow": ("top_k", "temperature", "mixing", "granularity", "prompt_layers"),
    "elrea": ("top_k", "temperature"),  # a library built with build-elrea, or the one it advises
    "uniform": ("mixing",),
    "single": ("expert",),
    "base": (),
}
MIXINGS = ("outputs", "parameters")
GRANULARITIES = ("token", "sequence")
ROLES = ("system", "user", "assistant")
FRAME_SECONDS = 0.05  # a streaming answer is shown at most 20 times a second


@dataclass(frozen=True)
class StrategySpec:
    """How to route one chat: a strategy name and its options (routing validates the rest)."""

    name: str = "arrow"
    top_k: int = 2
    temperature: float = 1.0  # Arrow's router temperature, ELREA's softmax temperature
    mixing: str = "outputs"  # Arrow and uniform: mix the experts' outputs or their parameters
    expert: str | None = None  # "single": the expert to use
    granularity: str = "token"  # Arrow: route every token, or each answer once by its prompt
    prompt_layers: tuple[int, ...] | None = None  # Arrow per sequence: the blocks scoring it

    def __post_init__(self) -> None:
        for option, value, allowed in (
            ("strategy", self.name, STRATEGIES),
            ("mixing", self.mixing, MIXINGS),
            ("granularity", self.granularity, GRANULARITIES),
        ):
            if value not in allowed:
                raise InvalidInputError(
                    f"unknown {option} {value!r}", hint=f"use one of {', '.join(allowed)}"
                )
        if self.name == "single" and not self.expert:
            raise InvalidInputError("the one-expert strategy needs an expert", hint="choose one")
        if self.prompt_layers is not None:  # a list from JSON; Arrow checks the numbers
            if isinstance(self.prompt_layers, (str, bytes)) or not hasattr(
                self.prompt_layers, "__iter__"
            ):
                raise InvalidInputError(
                    f"prompt_layers must be a list of block numbers, got {self.prompt_layers!r}"
                )
            object.__setattr__(self, "prompt_layers", tuple(self.prompt_layers) or None)

    def using(self) -> tuple[str, dict]:
        """The routing strategy's name and options, for ``routed.using`` (the prompt's blocks
        only for Arrow per sequence: per token, every block routes)."""
        options = {option: getattr(self, option) for option in STRATEGY_OPTIONS[self.name]}
        if self.granularity != "sequence":
            options.pop("prompt_layers", None)
        return self.name, options

    @property
    def label(self) -> str:
        if self.name == "arrow":
            per = ", per sequence" if self.granularity == "sequence" else ""
            if per and self.prompt_layers:
                blocks = "block" if len(self.prompt_layers) == 1 else "blocks"
                per += f" ({blocks} {', '.join(map(str, self.prompt_layers))})"
            return f"Arrow top-{self.top_k}, T={self.temperature:g}, {self.mixing} mixing{per}"
        if self.name == "elrea":
            return f"ELREA top-{self.top_k}, T={self.temperature:g}"
        if self.name == "uniform":
            return f"Uniform merge, {self.mixing} mixing"
        if self.name == "single":
            return f"One expert: {self.expert}"
        return "Base model"


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding options; ``temperature`` 0 decodes greedily."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        count = self.max_new_tokens
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4096:
            raise InvalidInputError(f"max_new_tokens must be an integer 1..4096, got {count!r}")
        if not (_is_number(self.temperature) and 0 <= self.temperature < math.inf):
            raise InvalidInputError(
                f"temperature must be >= 0 and finite, got {self.temperature!r}"
            )
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def generate_kwargs(self, max_new_tokens: int) -> dict:
        sampling = self.temperature > 0
        options = dict(max_new_tokens=max_new_tokens, do_sample=sampling)
        if sampling:
            options.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return options


@dataclass(frozen=True)
class TokenRouting:
    """What each expert got for every generated token: ``layers[layer][token][expert]``.

    Column ``t`` is the routing of the forward pass that produced generated token ``t`` (at the
    last prompt position for the first token, at token ``t - 1`` for the others). ``sequence``:
    for a strategy that chooses once per prompt (Arrow per sequence, ELREA), the weight each
    expert got for the whole answer.
    """

    experts: tuple[str, ...]
    tokens: tuple[str, ...]
    layers: dict[int, list[list[float]]]
    sequence: tuple[float, ...] | None = None

    def mean(self) -> list[list[float]]:
        """``[token][expert]`` averaged over layers (empty when nothing was routed)."""
        if not self.layers:
            return []
        return torch.tensor(list(self.layers.values())).mean(0).tolist()

    def to_dict(self) -> dict:
        return {
            "experts": list(self.experts),
            "tokens": list(self.tokens),
            "mean": self.mean(),
            "layers": {str(layer): weights for layer, weights in self.layers.items()},
            "sequence": list(self.sequence) if self.sequence is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TokenRouting:
        layers = {int(layer): weights for layer, weights in data["layers"].items()}
        sequence = data.get("sequence")
        return cls(
            tuple(data["experts"]),
            tuple(data["tokens"]),
            layers,
            tuple(sequence) if sequence is not None else None,
        )

    @classmethod
    def from_trace(cls, trace: RoutingTrace | None, tokens: Sequence[str]) -> TokenRouting:
        """The routing of a generation's ``tokens`` from its trace: one step per token."""
        if trace is None or not trace.modules:
            return cls((), tuple(tokens), {})
        count = len(tokens)
        layers = {
            layer: weights[0, :count].tolist()
            for layer, weights in trace.step_layer_weights().items()
        }
        chosen = trace.sequence_weights()
        sequence = tuple(chosen[0].get(e, 0.0) for e in trace.expert_names) if chosen else None
        return cls(tuple(trace.expert_names), tuple(tokens), layers, sequence)


class _Stop(StoppingCriteria):
    """Ends generation early once the reader has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _Detokenizer:
    """The text of a growing list of token ids, decoding only the ids since the last call and the
    few before them (which tokenizers that drop a word's leading space, or spread a character
    over several ids, need), the way text-generation-inference streams."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.text = tokenizer, ""
        self.prefix = self.read = 0  # ids[prefix:read] were decoded last time

    def __call__(self, ids: list[int]) -> str:
        end = len(ids)  # another thread may append meanwhile
        before = self.tokenizer.decode(ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[self.prefix : end], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # no half character
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, end
        return self.text


class _Answer(BaseStreamer):
    """One answer between the worker that generates it and the reader that shows it. As
    ``generate``'s streamer, the worker appends each new token id and flags it, nothing more; at
    the end it leaves the whole text and routing, or the error."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.news = threading.Event()  # something came since the reader last looked
        self.finished = threading.Event()  # the whole answer, or an error, is there
        self.left = threading.Event()  # the reader has gone: stop generating
        self.detokenizer: _Detokenizer | None = None  # set by the worker before the first id
        self.result: tuple[str, TokenRouting] | None = None
        self.error: Exception | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt
            self._prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        self.news.set()

    def end(self) -> None:
        """The worker ends the answer itself (``finish``), with its text and routing."""

    def finish(self, result=None, error: Exception | None = None) -> None:
        self.result, self.error = result, error
        self.finished.set()
        self.news.set()

    def frames(
        self, frame_seconds: float, worker: threading.Thread
    ) -> Iterator[tuple[str, TokenRouting | None]]:
        """The reader's side: the text so far when ids have come, at most once a frame (the
        first at once), then the whole answer with its routing once ``worker`` is done."""
        shown = -math.inf
        try:
            while True:
                self.news.wait()
                self.finished.wait(shown + frame_seconds - time.monotonic())  # frame or end
                self.news.clear()
                if self.finished.is_set():
                    worker.join()  # it only has its call's routing context left to leave
                    if self.error is not None:
                        raise self.error
                    yield self.result
                    return
                yield self.detokenizer(self.ids), None
                shown = time.monotonic()
        finally:
            self.left.set()  # the reader is done (or gone): let the worker finish now


class _Turns:
    """Chats share the model; a library swap waits for the running chats and has it alone (chats
    that come meanwhile wait for the swap)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._chats = 0
        self._swapping = False

    @contextmanager
    def chat(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._swapping)
            self._chats += 1
        try:
            yield
        finally:
            with self._changed:
                self._chats -= 1
                self._changed.notify_all()

    @contextmanager
    def swap(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._swapping)
            self._swapping = True
            self._changed.wait_for(lambda: self._chats == 0)
        try:
            yield
        finally:
            with self._changed:
                self._swapping = False
                self._changed.notify_all()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _turns(message, history: Sequence) -> list[dict]:
    """The chat so far as ``{role, content}`` turns, checked: the API takes any JSON."""
    if not isinstance(message, str) or not message.strip():
        raise InvalidInputError("the message is empty", hint="type something to send")
    turns = []
    for number, turn in enumerate(history):
        if not (isinstance(turn, dict) and turn.get("role") in ROLES and "content" in turn):
            raise InvalidInputError(
                f"history entry {number} is not a {{role, content}} message: {turn!r:.80}",
                hint=f"give history as messages whose role is one of {', '.join(ROLES)}",
            )
        turns.append({"role": turn["role"], "content": _message_text(turn["content"])})
    return [*turns, {"role": "user", "content": message}]


def _message_text(content) -> str:
    """A chat message's text, whether Gradio gives it as a string or as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_message_text(part) for part in content)
    return ""


def advice(library: Library, strategy: str) -> dict[str, Any]:
    """The options ``library``'s routing advice gives ``strategy`` (``Library.set_routing``)."""
    return dict((library.manifest.routing or {}).get(strategy, {}))


class ChatEngine:
    """One base model routed over one library, streamed to any number of sessions at once."""

    def __init__(
        self,
        registry: Registry,
        library_id: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._turns = _Turns()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.model = self.tokenizer = self._base_model = None
        self.routed: RoutedModel | None = None
        self.elrea: RoutedModel | None = None  # the advised ELREA library's, see _elrea_sibling
        self.elrea_library: str | None = None
        self.elrea_problem: str | None = None  # why the advised ELREA library cannot be used
        self._use(registry, Library.pull(registry, library_id))

    # -- the library ----------------------------------------------------------------------------
    def _use(self, registry: Registry, library: Library) -> None:
        """Route the base model ``library`` names over its experts (loading the model unless it
        is the one in memory, which is freed first)."""
        base_model = library.manifest.base_model
        if base_model != self._base_model:
            self.model = self.tokenizer = self._base_model = None
            self.model, self.tokenizer = load_base_model(
                registry, base_model, dtype=self.dtype, device=self.device
            )
            self._base_model = base_model
        # Before routing the model: the ELREA library's copy of it must not be routed.
        self.elrea, self.elrea_library, self.elrea_problem = self._elrea_sibling(registry, library)
        # Routed with no strategy of its own: every chat chooses one with routed.using().
        self.routed = route(self.model, library, "base") if library.names else None
        self.registry, self.library = registry, library

    def _elrea_sibling(
        self, registry: Registry, library: Library
    ) -> tuple[RoutedModel | None, str | None, str | None]:
        """ELREA chats on a library without ELREA's centroids go to the ELREA library its
        routing advice names (``{"elrea": {"library": repo_id}}``, as the demo's does: built
        from the same data on the same base model), routed over a copy of the base model.
        Returns it, its repo id and, when the advice cannot be followed, why: the library still
        chats, and ELREA chats are refused with that reason."""
        sibling = advice(library, "elrea").get("library")
        if sibling is None or library.artifact_path("elrea") is not None:
            return None, None, None
        named = f"the ELREA library {library.repo_id}'s routing advice names, {sibling!r},"
        try:
            elrea = Library.pull(registry, sibling)
        except NotFoundError:  # e.g. a registry holding an older demo, without its ELREA library
            return None, None, f"{named} is not in {registry.location}"
        except (QuiverError, TypeError) as error:  # not a repo id, a broken library
            return None, None, f"{named} cannot be used: {getattr(error, 'message', error)}"
        if elrea.manifest.base_model != library.manifest.base_model:
            base = library.manifest.base_model
            return None, None, f"{named} is built on {elrea.manifest.base_model}, not on {base}"
        return route(copy.deepcopy(self.model), elrea, "base"), sibling, None

    def load_library(self, registry: Registry, library_id: str) -> None:
        """Chat with another library from now on, once running chats are done. The base model
        stays if both name the same one; if the new library cannot be used, the old comes back."""
        library = Library.pull(registry, library_id)  # verified and fetched before anything goes
        with self._turns.swap():
            previous = (self.registry, self.library)
            if self.routed is not None:
                self.model = self.routed.unroute()
                self.routed = None
            try:
                self._use(registry, library)
            except QuiverError:
                self._use(*previous)
                raise

    @property
    def expert_names(self) -> list[str]:
        return self.library.names

    @property
    def first_block(self) -> int:
        """The first block the library's experts adapt (Arrow per sequence can score the
        prompt there alone)."""
        layers = [layer_of(name) for name in self.routed.routed_layers] if self.routed else []
        return min((layer for layer in layers if layer >= 0), default=0)

    @property
    def context_length(self) -> int:
        config = self.model.config
        return (
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or self.tokenizer.model_max_length
        )

    @property
    def _pad_token_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def describe(self) -> str:
        names = ", ".join(self.expert_names) or "no experts"
        text = (
            f"**{self.library.repo_id}** ({self.library.commit[:10]}) on "
            f"`{self.library.manifest.base_model}`: {len(self.expert_names)} experts ({names})"
        )
        if self.elrea_library is not None:
            text += f"; ELREA chats use **{self.elrea_library}**"
        if self.elrea_problem is not None:
            text += f"; no ELREA chats: {self.elrea_problem}"
        return text

    # -- chatting -------------------------------------------------------------------------------
    def prompt_ids(self, message: str, history: Sequence[dict], max_new_tokens: int):
        """The tokenized chat, oldest turns dropped until it leaves room to answer; returns the
        ids and how many new tokens fit."""
        turns = _turns(message, history)
        while True:
            ids = self._encode(turns)
            if len(ids) + max_new_tokens <= self.context_length or len(turns) == 1:
                break
            turns = turns[2:] if len(turns) > 2 else turns[-1:]
        room = self.context_length - len(ids)
        if room < 1:
            raise InvalidInputError(
                f"the prompt is {len(ids)} tokens but {self.library.manifest.base_model} reads "
                f"at most {self.context_length}",
                hint="shorten the message",
            )
        return torch.tensor([ids], device=self.model.device), min(max_new_tokens, room)

    def _encode(self, turns: list[dict]) -> list[int]:
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                turns, add_generation_prompt=True, tokenize=False
            )
        else:
            text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stream(
        self,
        message: str,
        history: Sequence[dict],
        strategy: StrategySpec,
        settings: GenerationSettings,
        *,
        frame_seconds: float = FRAME_SECONDS,
    ) -> Iterator[tuple[str, TokenRouting | None]]:
        """Start answering at once (beside any other chat); the iterator yields the answer so far
        at most once every ``frame_seconds`` (the first token at once), then the whole answer
        with its routing. Closing the iterator stops the answer."""
        answer = _Answer()
        job = (message, list(history), strategy, settings, answer)
        worker = threading.Thread(target=self._answer, args=job, daemon=True)
        worker.start()
        return answer.frames(frame_seconds, worker)

    def _answer(self, message, history, strategy, settings, answer: _Answer) -> None:
        """The worker: reads the chat, generates one answer with its strategy and routing."""
        try:
            with self._turns.chat():
                input_ids, max_new_tokens = self.prompt_ids(
                    message, history, settings.max_new_tokens
                )
                answer.detokenizer = _Detokenizer(self.tokenizer)
                with self._routing(strategy) as (model, trace):
                    output = model.generate(
                        input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        streamer=answer,
                        stopping_criteria=StoppingCriteriaList([_Stop(answer.left)]),
                        pad_token_id=self._pad_token_id,
                        **settings.generate_kwargs(max_new_tokens),
                    )
                    new = output[0, input_ids.shape[1] :].tolist()
                    text = self.tokenizer.decode(new, skip_special_tokens=True)
                    tokens = self.tokenizer.batch_decode([[token] for token in new])
                    answer.finish((text, TokenRouting.from_trace(trace, tokens)))
        except Exception as error:  # handed to the reader, who raises it in the request
            answer.finish(error=error)

    @contextmanager
    def _routing(self, strategy: StrategySpec) -> Iterator[tuple[torch.nn.Module, RoutingTrace]]:
        """The model routed by ``strategy`` for this call only, and the trace it records (none
        for the base model of a library without experts)."""
        if strategy.name == "elrea" and self.elrea_problem is not None:
            raise RoutingError(
                f"no ELREA chats with {self.library.repo_id}: {self.elrea_problem}",
                hint="choose another strategy, or fix the library's routing advice",
            )
        routed = self.elrea if strategy.name == "elrea" and self.elrea else self.routed
        if routed is None:
            if strategy.name != "base":
                raise RoutingError(
                    f"library {self.library.repo_id} has no experts",
                    hint="add experts in the Library tab, or chat with the base model",
                )
            yield self.model, None
            return
        name, options = strategy.using()
        with routed.using(name, **options), routed.trace() as trace:
            yield routed, trace
