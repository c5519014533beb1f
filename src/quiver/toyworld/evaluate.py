"""Score any causal LM on any list of tasks: exact match, per-token accuracy and answer NLL.

Scoring is teacher-forced: one forward over prompt + answer gives all three metrics at once, and
greedy exact match equals "every answer token (and ``</s>``) is the argmax", because a causal
model's prediction at a position depends only on what precedes it. A router that decides per
sequence is told where each prompt ends, so it sees what it sees in ``generate``.

With a model routed by Arrow or ELREA (``quiver.route``), every result also carries routing
diagnostics per layer: how often the top-1 expert (for ELREA: the prompt's heaviest member) lies
in the task's own cluster, and how the top-1 choices spread over the experts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from quiver.errors import InvalidInputError
from quiver.routing import ELREA, Arrow, RoutedModel
from quiver.routing.trace import layer_of
from quiver.toyworld.model import encode
from quiver.toyworld.tasks import Example, Task


@dataclass(frozen=True)
class LayerRouting:
    """One layer's routing on one task: the share of (token, module) top-1 choices in the task's
    cluster (None without a cluster map) and how the top-1 choices spread over the experts."""

    right_cluster: float | None
    top1: dict[str, float]


@dataclass(frozen=True)
class TaskResult:
    task: str
    cluster: str
    kind: str
    examples: int
    exact_match: float
    token_accuracy: float
    answer_nll: float  # nats per answer token
    routing: dict[int, LayerRouting] | None = None


@dataclass
class Evaluation:
    """The results of one model on a list of tasks."""

    results: list[TaskResult]
    metadata: dict = field(default_factory=dict)

    def select(self, *, held_out: bool | None = None) -> list[TaskResult]:
        return [r for r in self.results if held_out is None or (r.kind != "train") == held_out]

    def mean(self, metric: str = "exact_match", *, held_out: bool | None = None) -> float:
        """The unweighted mean of ``metric`` over the (training or held-out) tasks."""
        values = [getattr(r, metric) for r in self.select(held_out=held_out)]
        return sum(values) / len(values) if values else float("nan")

    def right_cluster(self, *, held_out: bool | None = None) -> float | None:
        """Routing's top-1 right-cluster rate, averaged over layers and tasks (None if unrouted)."""
        rates = [
            layer.right_cluster
            for r in self.select(held_out=held_out)
            for layer in (r.routing or {}).values()
            if layer.right_cluster is not None
        ]
        return sum(rates) / len(rates) if rates else None

    def to_dict(self) -> dict:
        return {"metadata": self.metadata, "results": [asdict(r) for r in self.results]}


def _sequence_routed(model: torch.nn.Module) -> bool:
    """Routed once per prompt: Arrow per sequence, or ELREA (its weights come from the prompt)."""
    strategy = getattr(model, "strategy", None)
    per_prompt = isinstance(strategy, ELREA) or getattr(strategy, "granularity", "") == "sequence"
    return isinstance(model, RoutedModel) and per_prompt


@torch.no_grad()
def score_examples(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> dict[str, torch.Tensor]:
    """Per example: ``correct`` (all answer tokens argmax), ``token_hits`` and ``tokens`` (answer
    tokens right / in all), ``nll`` (summed over answer tokens); plus the ``mask`` of real
    positions, for reading a routing trace of the same call.

    One forward over right-padded ``prompt + answer`` rows; a model routed per sequence is told
    where each prompt ends (``prompt_lengths``), so it routes by the prompt alone, as it would
    when generating.
    """
    pairs = [encode(tokenizer, example) for example in examples]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    targets = torch.full((len(pairs), width), -100)  # answer token expected at each position
    for row, (prompt, answer) in enumerate(pairs):
        ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        mask[row, : len(prompt) + len(answer)] = 1
        targets[row, len(prompt) - 1 : len(prompt) + len(answer) - 1] = torch.tensor(answer)
    device = next(model.parameters()).device
    options = {}
    if _sequence_routed(model):
        options["prompt_lengths"] = torch.tensor([len(p) for p, _ in pairs], device=device)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **options).logits
    logits, targets = logits.float().cpu(), targets
    answer = targets != -100
    nll = F.cross_entropy(logits.mT, targets.clamp(min=0), reduction="none") * answer
    hits = (logits.argmax(-1) == targets) & answer
    tokens = answer.sum(1)
    return {
        "correct": hits.sum(1) == tokens,
        "token_hits": hits.sum(1),
        "tokens": tokens,
        "nll": nll.sum(1),
        "mask": mask.bool(),
    }


def _routing_counts(trace, mask: torch.Tensor) -> dict[int, Counter]:
    """Per layer: how often each expert was the top-1 choice, over real tokens and modules."""
    counts: dict[int, Counter] = {}
    for module in trace.modules:
        top1 = trace.module_weights(module).argmax(-1)[mask]
        layer = counts.setdefault(layer_of(module), Counter())
        layer.update(trace.expert_names[i] for i in top1.tolist())
    return counts


def _layer_routing(counts: Counter, cluster: str, clusters: Mapping[str, str] | None):
    total = sum(counts.values())
    right = None
    if clusters is not None:
        right = sum(n for name, n in counts.items() if clusters.get(name) == cluster) / total
    return LayerRouting(right, {name: n / total for name, n in sorted(counts.items())})


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    *,
    examples: int = 200,
    split: str = "eval",
    seed: int = 0,
    batch_size: int = 100,
    expert_clusters: Mapping[str, str] | None = None,
    oracle: Mapping[str, str] | None = None,
) -> Evaluation:
    """Score ``model`` on ``examples`` examples of each task.

    ``expert_clusters`` maps expert names to the cluster each serves, for the right-cluster rate
    of an Arrow-routed model. ``oracle`` maps task names to the expert a model routed with
    ``strategy="oracle"`` must use on them.
    """
    if not tasks:
        raise InvalidInputError("no tasks to evaluate", hint="pass at least one Task")
    for name, value in (("examples", examples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    missing = [task.name for task in tasks if oracle is not None and task.name not in oracle]
    if missing:
        raise InvalidInputError(
            f"the oracle names no expert for {', '.join(missing)}",
            hint="map every task evaluated to its expert",
        )
    diagnose = isinstance(model, RoutedModel) and isinstance(model.strategy, (Arrow, ELREA))
    results = []
    for task in tasks:
        data = task.examples(examples, split=split, seed=seed)
        totals: dict[str, float] = Counter()
        counts: dict[int, Counter] = {}
        for start in range(0, len(data), batch_size):
            batch = data[start : start + batch_size]
            use = model.use_expert(oracle[task.name]) if oracle is not None else nullcontext()
            with use, model.trace() if diagnose else nullcontext() as trace:
                scored = score_examples(model, tokenizer, batch)
            for key in ("correct", "token_hits", "tokens", "nll"):
                totals[key] += scored[key].sum().item()
            if trace is not None:
                for layer, layer_counts in _routing_counts(trace, scored["mask"]).items():
                    counts.setdefault(layer, Counter()).update(layer_counts)
        routing = {
            layer: _layer_routing(c, task.cluster, expert_clusters) for layer, c in counts.items()
        }
        results.append(
            TaskResult(
                task=task.name,
                cluster=task.cluster,
                kind=task.kind,
                examples=len(data),
                exact_match=totals["correct"] / len(data),
                token_accuracy=totals["token_hits"] / totals["tokens"],
                answer_nll=totals["nll"] / totals["tokens"],
                routing=routing or None,
            )
        )
    return Evaluation(results)
