"""Pictures: the routing of an answer (experts x generated tokens) and the experts' similarity.

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


def routing_summary(routing: TokenRouting | None) -> str:
    """One line under the picture: each expert's share of the answer, largest first."""
    if routing is None:
        return ""
    if not routing.layers:
        return f"{len(routing.tokens)} tokens from the base model: no routing."
    weights = routing.mean()
    shares = [sum(column) / len(weights) for column in zip(*weights, strict=True)]
    ranked = sorted(zip(routing.experts, shares, strict=True), key=lambda pair: -pair[1])
    parts = " · ".join(f"{name} {share:.0%}" for name, share in ranked)
    return f"{len(routing.tokens)} tokens; share of the weight: {parts}"


def routing_figure(routing: TokenRouting | None, view: str = MEAN, title: str = "") -> Figure:
    """A heat-map of the weight each expert got for every generated token (rows: experts)."""
    figure = Figure(figsize=(8, 2.8), layout="constrained")
    axes = figure.add_subplot()
    if routing is None or not routing.layers:
        message = "no routing: the base model answered" if routing else "no answer yet"
        axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="gray")
        axes.set_axis_off()
        return figure
    weights = routing.mean() if view == MEAN else routing.layers[int(view.split()[-1])]
    image = axes.imshow(
        list(zip(*weights, strict=True)), aspect="auto", cmap="viridis", vmin=0, vmax=1
    )
    axes.set_yticks(range(len(routing.experts)), routing.experts)
    every = max(1, len(routing.tokens) // 48)  # at most ~48 labels stay legible
    ticks = range(0, len(routing.tokens), every)
    axes.set_xticks(ticks, [_shown(routing.tokens[t]) for t in ticks], fontsize=8)
    axes.set_xlabel("generated token")
    axes.set_title(f"{title}{': ' if title else ''}expert weights, {view}", fontsize=10)
    figure.colorbar(image, ax=axes, label="weight", fraction=0.03)
    return figure


def similarity_figure(names: Sequence[str], similarity: Sequence[Sequence[float]]) -> Figure:
    """A heat-map of pairwise expert similarity (cosine, from -1 to 1)."""
    size = max(3.5, 0.45 * len(names) + 2)
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1)
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    if len(names) <= 12:
        for i, row in enumerate(similarity):
            for j, value in enumerate(row):
                shown = f"{value:.2f}".replace("-0.00", "0.00")
                axes.text(j, i, shown, ha="center", va="center", fontsize=7)
    axes.set_title("similarity of the experts' weight updates (cosine)", fontsize=10)
    figure.colorbar(image, ax=axes, fraction=0.04)
    return figure
