"""The Chat tab: chat with the routed model, streamed, with the routing of every answer beside it;
and the ``chat`` API endpoint (``Client(url).predict(message, api_name="/chat")``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from quiver.app.engine import (
    GRANULARITIES,
    STRATEGIES,
    STRATEGY_OPTIONS,
    GenerationSettings,
    StrategySpec,
    advice,
)
from quiver.app.engine_process import Engine
from quiver.app.errors import readable_errors
from quiver.app.plots import MEAN, layer_choices, routing_figure, routing_summary

MODEL = "model"  # the concurrency group of every event that uses the shared model
# The options with a control, in StrategyControls' order.
CONTROLLED = ("top_k", "temperature", "mixing", "granularity", "prompt_layers", "expert")
PROMPT_SCOPES = [("Every block", "all"), ("The first block", "first")]


@dataclass
class StrategyControls:
    name: gr.Radio
    top_k: gr.Slider
    temperature: gr.Slider
    mixing: gr.Radio
    granularity: gr.Radio
    prompt_scope: gr.Radio
    expert: gr.Dropdown

    @property
    def options(self) -> list[gr.components.Component]:
        """The controls of ``CONTROLLED``, in its order."""
        return [
            self.top_k,
            self.temperature,
            self.mixing,
            self.granularity,
            self.prompt_scope,
            self.expert,
        ]

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.name, *self.options]


@dataclass
class ChatPane:
    chatbot: gr.Chatbot
    figure: gr.Plot
    summary: gr.Markdown
    view: gr.Dropdown
    routing: gr.State  # (strategy label, TokenRouting) of the last answer, for redrawing
    controls: StrategyControls

    @property
    def outputs(self) -> list:
        return [self.chatbot, self.figure, self.summary, self.routing, self.view]

    def cleared(self) -> dict:
        return {
            self.chatbot: [],
            self.figure: routing_figure(None),
            self.summary: "",
            self.routing: None,
            self.view: gr.update(choices=[MEAN], value=MEAN),
        }


@dataclass
class ChatTab:
    info: gr.Markdown
    panes: tuple[ChatPane, ChatPane]

    def refresh(self, engine: Engine) -> dict:
        """Updates that show the engine's current library (after a swap, or on page load)."""
        names, advised = engine.expert_names, _advised(engine)
        updates = {self.info: engine.describe()}
        for pane in self.panes:
            controls = pane.controls
            updates[controls.expert] = gr.update(choices=names, value=names[0] if names else None)
            updates[controls.top_k] = gr.update(
                maximum=_top_k_maximum(len(names)), value=advised["top_k"]
            )
            updates[controls.granularity] = gr.update(value=advised["granularity"])
            updates[controls.prompt_scope] = gr.update(value=advised["prompt_scope"])
        return updates

    @property
    def outputs(self) -> list[gr.components.Component]:
        changed = ("expert", "top_k", "granularity", "prompt_scope")
        return [self.info] + [getattr(p.controls, name) for p in self.panes for name in changed]


def _advised(engine: Engine) -> dict[str, Any]:
    """The Arrow controls' first values: the library's routing advice where it gives a usable
    one (it comes from the library's author), else top-2, per sequence, every block."""
    arrow = advice(engine.library, "arrow")
    top_k = arrow.get("top_k")
    top_k = top_k if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0 else 2
    granularity = arrow.get("granularity")
    return {
        "top_k": min(top_k, max(1, len(engine.expert_names))),
        "granularity": granularity if granularity in GRANULARITIES else "sequence",
        "prompt_scope": "first" if arrow.get("prompt_layers") == [engine.first_block] else "all",
    }


def _top_k_maximum(experts: int) -> int:
    """Top-k goes from 1 to the number of experts (a slider needs two values to slide between)."""
    return max(2, experts)


def _options_shown(strategy: str) -> list[bool]:
    """Which of the ``CONTROLLED`` options ``strategy`` uses."""
    return [option in STRATEGY_OPTIONS[strategy] for option in CONTROLLED]


def _strategy_controls(engine: Engine, title: str, default: str, key: str) -> StrategyControls:
    count = len(engine.expert_names)
    shown = _options_shown(default)
    advised = _advised(engine)
    with gr.Group():
        name = gr.Radio(
            [(label, name) for name, label in STRATEGIES.items()],
            value=default,
            label=title,
            elem_id=f"strategy-{key}",
        )
        with gr.Row():
            top_k = gr.Slider(
                minimum=1,
                maximum=_top_k_maximum(count),
                value=advised["top_k"],
                step=1,
                label="Top-k",
                visible=shown[0],
            )
            temperature = gr.Slider(
                0.05, 5.0, value=1.0, step=0.05, label="Router temperature", visible=shown[1]
            )
        mixing = gr.Radio(
            [("Mix outputs", "outputs"), ("Mix parameters", "parameters")],
            value="outputs",
            label="Mixing",
            visible=shown[2],
        )
        granularity = gr.Radio(
            [("Route every token", "token"), ("Route the answer once, by its prompt", "sequence")],
            value=advised["granularity"],
            label="Granularity",
            visible=shown[3],
            elem_id=f"granularity-{key}",
        )
        prompt_scope = gr.Radio(
            PROMPT_SCOPES,
            value=advised["prompt_scope"],
            label="Once per answer: score the prompt at",
            visible=shown[4],
            elem_id=f"prompt-scope-{key}",
        )
        expert = gr.Dropdown(
            engine.expert_names,
            value=engine.expert_names[0] if count else None,
            label="Expert",
            visible=shown[5],
            elem_id=f"expert-{key}",
        )
    controls = StrategyControls(name, top_k, temperature, mixing, granularity, prompt_scope, expert)
    name.change(
        lambda chosen: [gr.update(visible=shown) for shown in _options_shown(chosen)],
        name,
        controls.options,
        queue=False,
        api_visibility="private",
    )
    return controls


def _spec(name, top_k, temperature, mixing, granularity, prompt_layers, expert) -> StrategySpec:
    return StrategySpec(
        name,
        int(top_k),
        float(temperature),
        mixing,
        expert or None,
        granularity or "token",
        prompt_layers,
    )


def _layers(engine: Engine, scope: str) -> tuple[int, ...] | None:
    """The blocks a prompt scope names: the first the experts adapt, or all (None)."""
    return (engine.first_block,) if scope == "first" else None


def _interleaved(streams: dict) -> Iterator[tuple]:
    """``(key, item)`` from several iterators at once, taking turns, until all are done."""
    live = dict(streams)
    while live:
        for key, stream in list(live.items()):
            item = next(stream, None)
            if item is None:
                del live[key]
            else:
                yield key, item


def _answer_column(title: str, key: str, visible: bool):
    """A chat and, under it, the routing of its last answer with a choice of layer."""
    with gr.Column(scale=4, visible=visible) as column:
        chatbot = gr.Chatbot(label=title, height=360, elem_id=f"chat-{key}")
        figure = gr.Plot(routing_figure(None), show_label=False, elem_id=f"routing-{key}")
        with gr.Row():
            summary = gr.Markdown(elem_id=f"summary-{key}")
            view = gr.Dropdown([MEAN], value=MEAN, show_label=False, elem_id=f"layers-{key}")
    return column, chatbot, figure, summary, view


def chat_tab(engine: Engine, concurrency: int, examples: Sequence[str] | None = None) -> ChatTab:
    """The tab; ``examples``: messages to offer under the message box."""
    info = gr.Markdown(engine.describe())
    with gr.Row():
        _, *pane_a = _answer_column("Answer", "a", True)
        second_answer, *pane_b = _answer_column("Second strategy", "b", False)
        with gr.Column(scale=2):
            controls_a = _strategy_controls(engine, "Strategy", "arrow", "a")
            side_by_side = gr.Checkbox(
                label="Side by side: answer with a second strategy too", elem_id="side-by-side"
            )
            with gr.Column(visible=False) as second_controls:
                controls_b = _strategy_controls(engine, "Second strategy", "base", "b")
            with gr.Accordion("Generation", open=False):
                max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
                temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
    with gr.Row():
        message = gr.Textbox(
            placeholder="Type a message and press Enter",
            show_label=False,
            scale=6,
            elem_id="message",
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        clear = gr.Button("Clear", scale=1)
    if examples:
        gr.Examples(list(examples), message, label="Try")
    panes = (
        ChatPane(*pane_a, gr.State(), controls_a),
        ChatPane(*pane_b, gr.State(), controls_b),
    )

    per_pane = len(controls_a.inputs)

    @readable_errors
    def respond(message_text, history_a, history_b, both, *values):
        """Answer with one strategy, or with two at once (side by side), streamed."""
        specs = [
            _spec(*chosen[:5], _layers(engine, scope), expert)
            for *chosen, scope, expert in (values[:per_pane], values[per_pane : 2 * per_pane])
        ]
        max_new_tokens, temperature, top_p = values[2 * per_pane :]
        settings = GenerationSettings(int(max_new_tokens), float(temperature), float(top_p))
        user = {"role": "user", "content": message_text}
        asked = list(zip(panes, specs, (history_a or [], history_b or []), strict=True))
        streams = {
            index: engine.stream(message_text, before, strategy, settings)
            for index, (_, strategy, before) in enumerate(asked[: 2 if both else 1])
        }
        for index, (text, routing) in _interleaved(streams):
            pane, strategy, before = asked[index]
            history = [*before, user, {"role": "assistant", "content": text}]
            update = {message: "", pane.chatbot: history}  # the message stays if refused
            if routing is not None:
                update[pane.figure] = routing_figure(routing, MEAN, strategy.label)
                update[pane.summary] = routing_summary(routing)
                update[pane.routing] = (strategy.label, routing)
                update[pane.view] = gr.update(choices=layer_choices(routing), value=MEAN)
            yield update

    inputs = [message, panes[0].chatbot, panes[1].chatbot, side_by_side, *controls_a.inputs]
    inputs += [*controls_b.inputs, max_new_tokens, temperature, top_p]
    outputs = [message, *panes[0].outputs, *panes[1].outputs]
    for trigger in (send.click, message.submit):
        trigger(
            respond,
            inputs,
            outputs,
            api_visibility="private",
            concurrency_limit=concurrency,
            concurrency_id=MODEL,
            show_progress="hidden",  # the streaming answer shows progress; errors come as a toast
        )

    def redraw(shown, view):
        return routing_figure(shown[1], view, shown[0]) if shown else routing_figure(None)

    for pane in panes:
        pane.view.input(redraw, [pane.routing, pane.view], pane.figure, api_visibility="private")
    clear.click(
        lambda: panes[0].cleared() | panes[1].cleared(),
        None,
        [*panes[0].outputs, *panes[1].outputs],
        api_visibility="private",
    )
    side_by_side.change(
        lambda on: [gr.update(visible=on)] * 2,
        side_by_side,
        [second_answer, second_controls],
        queue=False,
        api_visibility="private",
    )
    _chat_endpoint(engine, concurrency)
    return ChatTab(info, panes)


def _chat_endpoint(engine: Engine, concurrency: int) -> None:
    @readable_errors
    def chat(
        message: str,
        strategy: str = "arrow",
        top_k: int = 2,
        router_temperature: float = 1.0,
        mixing: str = "outputs",
        granularity: str = "token",
        expert: str = "",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        history: list | None = None,
        prompt_layers: list[int] | None = None,
    ) -> Iterator[tuple[str, dict]]:
        """Answer a message with the routed model, streamed as it is written (at most 20 updates
        a second). strategy: arrow, elrea (a library built with build-elrea, or the one its
        routing advice names, as the demo's does), uniform, single (with expert) or base; Arrow
        routes every token (granularity "token") or the whole answer once by its prompt
        ("sequence"), scored at every block or at prompt_layers only (e.g. [0], as the demo
        library's routing advice recommends). Each update is [answer so far,
        routing]; routing is null until the answer is complete, then {experts, tokens, mean:
        [token][expert], layers: {layer: [token][expert]}, sequence: [expert] weights of the
        whole answer (Arrow per sequence, ELREA) or null}.
        """
        spec = _spec(
            strategy, top_k, router_temperature, mixing, granularity, prompt_layers, expert
        )
        settings = GenerationSettings(max_new_tokens, temperature, top_p)
        for text, routing in engine.stream(message, history or [], spec, settings):
            yield text, routing.to_dict() if routing else None

    gr.api(chat, api_name="chat", concurrency_limit=concurrency, concurrency_id=MODEL)
