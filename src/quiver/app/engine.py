"""The one model in memory, shared by every session: every chat goes through ``ChatEngine.stream``.

Today ``quiver.route`` wraps the base model's layers in place with one strategy, so the engine
serialises model access with a lock: a chat takes it, routes the model with its strategy if
another one is active, generates, records its own routing trace and lets go. A second chat waits
for the first (Gradio's queue keeps the page responsive meanwhile). Everything about that lives
here, so per-call strategies in ``quiver.routing`` can later let chats run side by side without
touching the UI.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from quiver.errors import InvalidInputError, QuiverError, RoutingError
from quiver.registry import Library, Registry
from quiver.routing import Arrow, Merge, RoutedModel, RoutingTrace, route, single
from quiver.routing.base_model import load_base_model

STRATEGIES = {
    "arrow": "Arrow",
    "uniform": "Uniform merge",
    "single": "One expert",
    "base": "Base model",
}
MIXINGS = ("outputs", "parameters")


@dataclass(frozen=True)
class StrategySpec:
    """How to route one chat: a strategy name and its options (validated when it is built)."""

    name: str = "arrow"
    top_k: int = 2
    temperature: float = 1.0  # Arrow's router temperature
    mixing: str = "outputs"  # Arrow and uniform: mix the experts' outputs or their parameters
    expert: str | None = None  # "single": the expert to use

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise InvalidInputError(
                f"unknown strategy {self.name!r}", hint=f"use one of {', '.join(STRATEGIES)}"
            )
        if self.mixing not in MIXINGS:
            raise InvalidInputError(
                f"unknown mixing {self.mixing!r}", hint=f"use one of {', '.join(MIXINGS)}"
            )
        if self.name == "single" and not self.expert:
            raise InvalidInputError("the one-expert strategy needs an expert", hint="choose one")

    def build(self) -> Arrow | Merge | None:
        """The routing strategy object, or None for the plain base model."""
        if self.name == "arrow":
            return Arrow(top_k=int(self.top_k), temperature=self.temperature, mixing=self.mixing)
        if self.name == "uniform":
            return Merge(mixing=self.mixing)
        if self.name == "single":
            return single(self.expert)
        return None

    @property
    def label(self) -> str:
        if self.name == "arrow":
            return f"Arrow top-{self.top_k}, T={self.temperature:g}, {self.mixing} mixing"
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
        if not 1 <= self.max_new_tokens <= 4096:
            raise InvalidInputError(f"max_new_tokens must be 1..4096, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")

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
    last prompt position for the first token, at token ``t - 1`` for the others).
    """

    experts: tuple[str, ...]
    tokens: tuple[str, ...]
    layers: dict[int, list[list[float]]]

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
        }

    @classmethod
    def from_dict(cls, data: dict) -> TokenRouting:
        layers = {int(layer): weights for layer, weights in data["layers"].items()}
        return cls(tuple(data["experts"]), tuple(data["tokens"]), layers)

    @classmethod
    def from_trace(
        cls, trace: RoutingTrace | None, prompt_length: int, tokens: Sequence[str]
    ) -> TokenRouting:
        if trace is None or not trace.modules:
            return cls((), tuple(tokens), {})
        first, count = prompt_length - 1, len(tokens)
        layers = {
            layer: weights[0, first : first + count].tolist()
            for layer, weights in trace.layer_weights().items()
        }
        return cls(tuple(trace.expert_names), tuple(tokens), layers)


class _Stop(StoppingCriteria):
    """Ends generation early once the reader has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Hands each new token id to the reading thread (``generate`` first puts the prompt)."""

    def __init__(self, out: queue.Queue) -> None:
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.out.put(("token", token))

    def end(self) -> None:
        """The worker signals the end itself, with the routing it recorded."""


def _drain(out: queue.Queue) -> list:
    """The next item (waiting for it) and every other item already there."""
    items = [out.get()]
    with suppress(queue.Empty):
        while True:
            items.append(out.get_nowait())
    return items


def _message_text(content) -> str:
    """A chat message's text, whether Gradio gives it as a string or as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_message_text(part) for part in content)
    return ""


class ChatEngine:
    """One base model routed over one library, streamed to any number of sessions."""

    def __init__(
        self,
        registry: Registry,
        library_id: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self._load(registry, library_id)

    # -- the library ----------------------------------------------------------------------------
    def _load(self, registry: Registry, library_id: str) -> None:
        library = Library.pull(registry, library_id)
        self.model, self.tokenizer = load_base_model(
            registry, library.manifest.base_model, dtype=self.dtype, device=self.device
        )
        self.registry, self.library = registry, library
        self._routed: RoutedModel | None = None
        self._active: StrategySpec | None = None

    def load_library(self, registry: Registry, library_id: str) -> None:
        """Chat with another library from now on, once running chats are done. The base model
        stays if both name the same one; otherwise the old one is freed before the new loads
        (and loaded again if the new one cannot be)."""
        library = Library.pull(registry, library_id)  # verified and fetched before anything goes
        with self._lock:
            self._unroute()
            if library.manifest.base_model != self.library.manifest.base_model:
                previous = (self.registry, self.library.manifest.base_model)
                self.model = self.tokenizer = None
                try:
                    self.model, self.tokenizer = load_base_model(
                        registry, library.manifest.base_model, dtype=self.dtype, device=self.device
                    )
                except QuiverError:
                    self.model, self.tokenizer = load_base_model(
                        *previous, dtype=self.dtype, device=self.device
                    )
                    raise
            self.registry, self.library = registry, library

    @property
    def expert_names(self) -> list[str]:
        return self.library.names

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
        return (
            f"**{self.library.repo_id}** ({self.library.commit[:10]}) on "
            f"`{self.library.manifest.base_model}`: {len(self.expert_names)} experts ({names})"
        )

    # -- chatting -------------------------------------------------------------------------------
    def prompt_ids(self, message: str, history: Sequence[dict], max_new_tokens: int):
        """The tokenized chat, oldest turns dropped until it leaves room to answer; returns the
        ids and how many new tokens fit."""
        if not message.strip():
            raise InvalidInputError("the message is empty", hint="type something to send")
        turns = [{"role": m["role"], "content": _message_text(m["content"])} for m in history]
        turns.append({"role": "user", "content": message})
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
    ) -> Iterator[tuple[str, TokenRouting | None]]:
        """Yield the answer so far whenever new tokens are ready (after every token while the
        reader keeps up, several at once when it lags), then the whole answer with its routing."""
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        job = (message, list(history), strategy, settings, out, stop)
        threading.Thread(target=self._generate, args=job, daemon=True).start()
        ids: list[int] = []
        try:
            while True:
                routing = None
                for kind, value in _drain(out):
                    if kind == "error":
                        raise value
                    if kind == "done":
                        routing = value
                    else:
                        ids.append(value)
                yield self._decode(ids), routing
                if routing is not None:
                    return
        finally:
            stop.set()  # the reader is done (or gone): let the worker finish now

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _generate(self, message, history, strategy, settings, out, stop) -> None:
        """The worker: owns the model (and its tokenizer, which a library swap may replace) while
        it reads the chat, generates one answer and records its routing."""
        try:
            with self._lock:
                if stop.is_set():
                    return
                input_ids, max_new_tokens = self.prompt_ids(
                    message, history, settings.max_new_tokens
                )
                model = self._use(strategy)
                tracing = model.trace() if isinstance(model, RoutedModel) else nullcontext()
                with tracing as trace:
                    output = model.generate(
                        input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        streamer=_TokenQueue(out),
                        stopping_criteria=StoppingCriteriaList([_Stop(stop)]),
                        pad_token_id=self._pad_token_id,
                        **settings.generate_kwargs(max_new_tokens),
                    )
                new = output[0, input_ids.shape[1] :].tolist()
                tokens = [self.tokenizer.decode([token]) for token in new]
                out.put(("done", TokenRouting.from_trace(trace, input_ids.shape[1], tokens)))
        except Exception as error:  # handed to the reader, who raises it in the request
            out.put(("error", error))

    def _use(self, strategy: StrategySpec):
        """The model routed with ``strategy`` (re-routing it if another strategy is active)."""
        if strategy == self._active:
            return self._routed or self.model
        if strategy.name != "base" and not self.expert_names:
            raise RoutingError(
                f"library {self.library.repo_id} has no experts",
                hint="add experts in the Library tab, or chat with the base model",
            )
        built = strategy.build()  # validate before unrouting anything
        self._unroute()
        if built is not None:
            self._routed = route(self.model, self.library, built)
        self._active = strategy
        return self._routed or self.model

    def _unroute(self) -> None:
        if self._routed is not None:
            self.model = self._routed.unroute()
        self._routed, self._active = None, None
