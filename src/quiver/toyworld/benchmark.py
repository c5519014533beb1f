"""``quiver toyworld run``: build the libraries, score every method, write the table and chart.

Rows: the base model; one shared expert trained on all tasks; for the private library (one
expert per task) and the MBC library (one expert per cluster): the uniform merge (mu), Arrow per
token (top-1/2/4, the paper's), Arrow per sequence (top-1/2 over the whole prompt; top-1 without
the chat template's tokens, and over the inputs alone) and the oracle (each training task's own
expert; for a held-out task, the library's best single expert, picked with hindsight); ELREA (a
library built on all the tasks' examples pooled), as the paper routes it (a logit ensemble of all
members) and top-1. Every routed row carries its routing diagnostics; the goals of the benchmark
are checked against the table and reported, met or not.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiver.registry import Library, LocalRegistry, Registry
from quiver.routing import route
from quiver.toyworld.evaluate import Evaluation, evaluate
from quiver.toyworld.model import instruction_token_ids
from quiver.toyworld.pipeline import (
    Built,
    ElreaClusters,
    RunConfig,
    Stages,
    adjusted_rand,
    best_single,
    build_libraries,
    elrea_clusters,
    expert_clusters,
    method_list,
    oracle_evaluation,
)
from quiver.training.trainer import torch_threads

LIBRARIES = ("private", "MBC")
ELREA_SAMPLE = 100  # training examples per task for ELREA's cluster diagnostics
GOAL_METHOD = ("Arrow per sequence, top-1", "MBC")


@dataclass
class Row:
    """One method's line of the table."""

    method: str
    library: str
    evaluation: Evaluation

    @property
    def label(self) -> str:
        return self.method if self.library == "-" else f"{self.method} ({self.library})"

    def summary(self) -> dict[str, float | None]:
        e = self.evaluation
        kinds = {r.kind for r in e.results}
        out = {
            "train_em": e.mean(held_out=False),
            "held_out_em": e.mean(held_out=True),
            "train_nll": e.mean("answer_nll", held_out=False),
            "held_out_nll": e.mean("answer_nll", held_out=True),
            "right_cluster_train": e.right_cluster(held_out=False),
            "right_cluster_held_out": e.right_cluster(held_out=True),
        }
        for kind in sorted(kinds - {"train"}):
            values = [r.exact_match for r in e.results if r.kind == kind]
            out[f"{kind}_em"] = sum(values) / len(values)
        return out


@dataclass
class Results:
    rows: list[Row]
    adjusted_rand: float
    clusters: dict[str, list[str]]
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    elrea: ElreaClusters | None = None  # on a sample of the training examples

    def row(self, method: str, library: str) -> Row:
        return next(r for r in self.rows if (r.method, r.library) == (method, library))

    def goals(self) -> dict[str, dict[str, Any]]:
        """The benchmark's goals on held-out exact match, each with its numbers and verdict."""
        score = self.row(*GOAL_METHOD).summary()["held_out_em"]

        def held(method: str, library: str = "-") -> float:
            return self.row(method, library).summary()["held_out_em"]

        uniform = max(held("uniform merge (mu)", lib) for lib in LIBRARIES)
        oracle = max(held("oracle", lib) for lib in LIBRARIES)
        closed = (score - uniform) / (oracle - uniform) if oracle > uniform else float("nan")
        return {
            "above base": {"value": score, "than": held("base"), "met": score > held("base")},
            "above shared": {
                "value": score,
                "than": held("shared"),
                "met": score > held("shared"),
            },
            "above uniform": {"value": score, "than": uniform, "met": score > uniform},
            "closes half the gap from uniform to the oracle": {
                "value": closed,
                "uniform": uniform,
                "oracle": oracle,
                "met": closed >= 0.5,
            },
            "MBC clusters match the designed ones (ARI >= 0.9)": {
                "value": self.adjusted_rand,
                "met": self.adjusted_rand >= 0.9,
            },
        }

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "timings_s": self.timings,
            "adjusted_rand_index": self.adjusted_rand,
            "mbc_clusters": self.clusters,
            "elrea_clusters": dataclasses.asdict(self.elrea) if self.elrea else None,
            "goals": self.goals(),
            "rows": [
                {
                    "method": r.method,
                    "library": r.library,
                    "summary": r.summary(),
                    "tasks": r.evaluation.to_dict()["results"],
                }
                for r in self.rows
            ],
        }

    def markdown(self) -> str:
        head = (
            "| method | library | train EM | held-out EM | paraphrase EM | new format EM | "
            "train NLL | held-out NLL | right cluster, train / held-out |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
        )
        lines = []
        for r in self.rows:
            s = r.summary()
            right = s["right_cluster_train"], s["right_cluster_held_out"]
            routing = " / ".join(f"{v:.2f}" for v in right) if right[0] is not None else ""
            lines.append(
                f"| {r.method} | {r.library} | {s['train_em']:.3f} | {s['held_out_em']:.3f} | "
                f"{s.get('paraphrase_em', float('nan')):.3f} | "
                f"{s.get('new format_em', float('nan')):.3f} | {s['train_nll']:.2f} | "
                f"{s['held_out_nll']:.2f} | {routing} |"
            )
        goals = "\n".join(
            f"- {name}: {'met' if g['met'] else 'NOT met'} ({_numbers(g)})"
            for name, g in self.goals().items()
        )
        return (
            head
            + "\n".join(lines)
            + f"\n\nMBC vs designed clusters: ARI {self.adjusted_rand:.2f}."
            + _elrea_line(self.elrea)
            + f"\n\nGoals (held-out exact match of {GOAL_METHOD[0]} over {GOAL_METHOD[1]} "
            f"experts):\n{goals}\n"
        )

    def plot(self, path: Path) -> Path:
        """Grouped bars: train and held-out exact match per method."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        rows = self.rows
        x = np.arange(len(rows))
        figure, axes = plt.subplots(figsize=(max(8, 0.7 * len(rows) + 2), 5))
        train = [r.summary()["train_em"] for r in rows]
        held = [r.summary()["held_out_em"] for r in rows]
        axes.bar(x - 0.2, train, 0.4, label="training tasks", color="#4c72b0")
        axes.bar(x + 0.2, held, 0.4, label="held-out tasks", color="#dd8452")
        axes.set_xticks(x, [r.label for r in rows], rotation=60, ha="right", fontsize=8)
        axes.set_ylabel("exact match")
        axes.set_ylim(0, 1.05)
        axes.set_title("Quiver toy world: exact match per method")
        axes.legend()
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    def save(self, output: Path) -> dict[str, Path]:
        output.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": output / "results.json",
            "markdown": output / "results.md",
            "chart": output / "results.png",
        }
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        paths["markdown"].write_text(self.markdown(), encoding="utf-8")
        self.plot(paths["chart"])
        return paths


def _elrea_line(elrea: ElreaClusters | None) -> str:
    if elrea is None:
        return ""
    members = "; ".join(
        f"{expert}: " + ", ".join(f"{task} {n}" for task, n in counts.items())
        for expert, counts in elrea.members.items()
    )
    return (
        f"\n\nELREA's example clusters vs designed clusters: ARI {elrea.adjusted_rand:.2f} "
        f"({ELREA_SAMPLE} training examples per task, each in its nearest centroid's cluster: "
        f"{members})."
    )


def _numbers(goal: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in goal.items() if isinstance(v, float))


def run(
    config: RunConfig,
    output: str | Path,
    *,
    registry: Registry | None = None,
    say: Callable[[str], None] = print,
) -> Results:
    """The whole benchmark; writes results.json, results.md and results.png into ``output``.

    The libraries are pushed to ``registry`` (default: a local store in ``output/registry``,
    emptied first) and pulled back from it before routing.
    """
    output = Path(output)
    if registry is None:  # the run's own store: a new run starts it afresh
        shutil.rmtree(output / "registry", ignore_errors=True)
        registry = LocalRegistry(output / "registry")
    stages = Stages(say)
    with tempfile.TemporaryDirectory(prefix="quiver-toyworld-shared-") as scratch:
        built = build_libraries(config, registry, stages, shared_dir=Path(scratch))
        with torch_threads(config.threads):
            return _score(config, built, stages, output, say)


def _score(config: RunConfig, built: Built, stages: Stages, output: Path, say) -> Results:
    """The scoring half of a run: the pulled libraries, every method."""
    registry = built.registry
    tasks = [*config.training_tasks(), *config.held_out_tasks()]
    model, tokenizer = built.model, built.tokenizer
    options = dict(examples=config.eval_examples, seed=config.seed)
    with stages.stage("pulling the libraries"):
        libraries = {
            "private": Library.pull(registry, built.private_id),
            "MBC": Library.pull(registry, built.mbc_id),
            "ELREA": Library.pull(registry, built.elrea_id),
        }
    with stages.stage("ELREA's clusters"):
        clusters = {label: expert_clusters(libraries[label], tasks) for label in LIBRARIES}
        elrea = elrea_clusters(
            model, tokenizer, libraries["ELREA"], config.training_tasks(), config, ELREA_SAMPLE
        )
        clusters["ELREA"] = elrea.expert_clusters(tasks) or None  # None: no right cluster
    with stages.stage("scoring every method"):
        rows = [Row("base", "-", evaluate(model, tokenizer, tasks, **options))]
        routed = route(model, {"shared": built.shared}, "single", expert="shared")
        rows.append(Row("shared", "-", evaluate(routed, tokenizer, tasks, **options)))
        routed.unroute()
        ignored = tokenizer.all_special_ids, instruction_token_ids(tokenizer)
        for method, label, strategy in method_list(libraries, *ignored):
            routed = route(model, libraries[label], strategy)
            scored = evaluate(routed, tokenizer, tasks, expert_clusters=clusters[label], **options)
            rows.append(Row(method, label, scored))
            routed.unroute()
        for label in LIBRARIES:
            library = libraries[label]
            own = oracle_evaluation(model, tokenizer, library, config.training_tasks(), config)
            held = best_single(model, tokenizer, library, config.held_out_tasks(), config)
            rows.append(Row("oracle", label, Evaluation([*own.results, *held])))
    mbc = libraries["MBC"]
    results = Results(
        rows=rows,
        adjusted_rand=adjusted_rand(mbc, config.training_tasks()),
        clusters=(mbc.manifest.build or {}).get("tasks", {}),
        config=config.describe(),
        timings=stages.timings,
        elrea=elrea,
    )
    paths = results.save(output)
    say(results.markdown())
    say(f"Saved {', '.join(str(p) for p in paths.values())}")
    return results
