"""Pictures of the routing of an answer: experts x generated tokens, and for a strategy that
chooses once per prompt the weight of each expert for the whole answer beside it.

Figures are built with matplotlib's object API (no pyplot state), so sessions can draw at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from quiver.app.engine import TokenRouting

MEAN = "mean over layers"


def _shown(token: str) -> str:
    """A token as a tick label: spaces, line breaks and invisible characters made visible."""
    visible = token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥")
    return visible if visible.isprintable() and visible else repr(token)[1:-1] or "∅"


def layer_choices(routing: TokenRouting | None) -> list[str]:
    """The per-layer views of an answer's routing, the mean over layers first."""
    return [MEAN, *(f"layer {layer}" for layer in sorted(routing.layers))] if routing else [MEAN]


def _ranked(experts: Sequence[str], weights: Sequence[float], *, chosen: bool = False) -> str:
    """``name 62% · name 38%``, largest first (only the experts with weight if ``chosen``)."""
    ranked = sorted(zip(experts, weights, strict=True), key=lambda pair: -pair[1])
    return " · ".join(f"{name} {weight:.0%}" for name, weight in ranked if weight or not chosen)


def routing_summary(routing: TokenRouting | None) -> str:
    """One line under the picture: each expert's share of the answer, largest first."""
    if routing is None:
        return ""
    if not routing.layers:
        return f"{len(routing.tokens)} tokens from the base model: no routing."
    if routing.sequence is not None:
        chosen = _ranked(routing.experts, routing.sequence, chosen=True)
        return f"{len(routing.tokens)} tokens; chosen for the whole answer: {chosen}"
    weights = routing.mean()
    shares = [sum(column) / len(weights) for column in zip(*weights, strict=True)]
    return f"{len(routing.tokens)} tokens; share of the weight: {_ranked(routing.experts, shares)}"


def _whole_answer(axes, routing: TokenRouting) -> None:
    """Bars of the weight each expert got for the whole answer, rows as the heat-map's."""
    bars = axes.barh(range(len(routing.experts)), routing.sequence, color="tab:green")
    axes.bar_label(bars, [f"{w:.0%}" if w else "" for w in routing.sequence], fontsize=8)
    axes.set_xlim(0, 1.3)
    axes.set_xticks([0, 1], ["0", "1"])
    axes.set_title("whole answer", fontsize=10)


def routing_figure(routing: TokenRouting | None, view: str = MEAN, title: str = "") -> Figure:
    """A heat-map of the weight each expert got for every generated token (rows: experts); for
    a choice made once per prompt, its weights for the whole answer on the left."""
    figure = Figure(figsize=(8, 2.8), layout="constrained")
    if routing is None or not routing.layers:
        axes = figure.add_subplot()
        message = "no routing: the base model answered" if routing else "no answer yet"
        axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="gray")
        axes.set_axis_off()
        return figure
    if routing.sequence is not None:
        answer_axes, axes = figure.subplots(1, 2, sharey=True, width_ratios=(1, 6))
    else:
        answer_axes, axes = None, figure.add_subplot()
    weights = routing.mean() if view == MEAN else routing.layers[int(view.split()[-1])]
    image = axes.imshow(
        list(zip(*weights, strict=True)), aspect="auto", cmap="viridis", vmin=0, vmax=1
    )
    axes.set_yticks(range(len(routing.experts)), routing.experts)
    if answer_axes is not None:
        _whole_answer(answer_axes, routing)
        axes.set_ylim(len(routing.experts) - 0.5, -0.5)  # the first expert on top, as imshow's
        axes.tick_params(axis="y", labelleft=False)  # the bars' axes name the experts
    every = max(1, len(routing.tokens) // 48)  # at most ~48 labels stay legible
    ticks = range(0, len(routing.tokens), every)
    axes.set_xticks(ticks, [_shown(routing.tokens[t]) for t in ticks], fontsize=8)
    axes.set_xlabel("generated token")
    axes.set_title(f"expert weights per token, {view}", fontsize=10)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.colorbar(image, ax=axes, label="weight", fraction=0.03)
    return figure
