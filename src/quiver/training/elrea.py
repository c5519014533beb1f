"""Build an ELREA library (arXiv 2502.00089): cluster training examples by their gradients and
train one expert per cluster from a shared base adapter.

1. Train a base LoRA on all the data.
2. Every example's gradient feature: the gradient of its prompt's loss with respect to the base
   adapter, count-sketched to ``projection_dim`` and normalised (``quiver.routing.gradients``,
   the recipe routing applies to new prompts).
3. Cluster the features: BIRCH (the paper's) or k-means, fitted on ``fit_examples`` of them
   (5000 as reported), the rest assigned to the nearest centroid by cosine.
4. Train one expert per cluster, continuing from the base adapter (local or Ray).
5. Publish the library: the base adapter (``base``), the experts (``cluster-<i>``), and the
   ``elrea`` artifact routing needs (``ElreaArtifact``: centroids, standardisation statistics,
   projection seed and dimension).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from quiver.errors import TrainingError
from quiver.registry import Expert, Library, Registry
from quiver.routing import route
from quiver.routing.elrea import PromptGradients, prompt_features
from quiver.routing.elrea_artifact import ARTIFACT_NAME, ElreaArtifact, gradient_dim
from quiver.routing.experts import load_experts
from quiver.routing.gradients import MIN_PROMPT_TOKENS, CountSketch
from quiver.training.build import _train_clusters, require_new_library
from quiver.training.data import (
    IGNORE_INDEX,
    DataSource,
    Example,
    load_examples,
    tokenize_examples,
)
from quiver.training.trainer import TrainConfig, _pad_id, context_length, load_base

CLUSTERINGS = ("birch", "kmeans")
BASE = "base"


def prompt_ids(examples: Sequence[Example], tokenizer: Any, *, max_length: int) -> list[list[int]]:
    """Each example's instruction tokens: those before its first response token."""
    prompts = []
    for example, feature in zip(
        examples, tokenize_examples(examples, tokenizer, max_length=max_length), strict=True
    ):
        labels = feature["labels"]
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        if start < MIN_PROMPT_TOKENS:
            raise TrainingError(
                f"{example.source}: the prompt has {start} token(s); ELREA clusters examples by "
                f"the gradient of the prompt's loss, which needs at least {MIN_PROMPT_TOKENS}",
                hint="give every example a non-empty prompt",
            )
        prompts.append(feature["input_ids"][:start])
    return prompts


def gradient_features(
    model: Any,
    base_adapter: str | Path,
    prompts: Sequence[Sequence[int]],
    projection: CountSketch,
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: bool | None = None,
) -> torch.Tensor:
    """Unit gradient features ``[examples, dim]`` of ``prompts`` with the base adapter, in
    batches of similar lengths (less padding)."""
    progress = sys.stderr.isatty() if progress is None else progress
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    features = torch.empty(len(prompts), projection.dim)
    routed = route(model, {BASE: base_adapter}, PromptGradients(projection, BASE))
    device = next(model.parameters()).device
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="Gradient features", unit="batch", disable=not progress):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for row, i in enumerate(rows):
                ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
                mask[row, : len(prompts[i])] = 1
            features[rows] = prompt_features(routed, ids.to(device), mask.to(device)).cpu()
    finally:
        routed.unroute()
    return features


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Clusters numbered by their first example, so names do not depend on a fit's order."""
    order = {label: i for i, label in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[label] for label in labels.tolist()])


def cluster_features(
    features: torch.Tensor,
    k: int,
    *,
    method: str = "birch",
    fit_examples: int = 5000,
    threshold: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """Cluster unit features into ``k`` clusters: ``method`` fitted on ``fit_examples`` of them
    (drawn with ``seed``), the others assigned to the nearest centroid by cosine. Returns each
    example's cluster, numbered by first appearance."""
    from sklearn.cluster import Birch, KMeans
    from sklearn.exceptions import ConvergenceWarning

    if method not in CLUSTERINGS:
        raise TrainingError(f"unknown clustering {method!r}", hint=f"use one of {CLUSTERINGS}")
    count = len(features)
    if not 1 <= k <= count:
        raise TrainingError(
            f"cannot make {k} clusters of {count} examples", hint=f"pick k from 1 to {count}"
        )
    points = features.double().numpy()
    fit = np.random.default_rng(seed).permutation(count)[: max(k, min(fit_examples, count))]
    fitted = np.zeros(len(fit), dtype=int)
    if k > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                if method == "birch":
                    model = Birch(n_clusters=k, threshold=threshold)
                else:
                    model = KMeans(n_clusters=k, n_init=10, random_state=seed)
                fitted = model.fit_predict(points[fit])
            except ConvergenceWarning as warning:
                raise TrainingError(
                    f"{method} found fewer than {k} clusters: {warning}",
                    hint="lower the BIRCH threshold, use k-means, or ask for fewer clusters",
                ) from None
    centroids = np.stack([points[fit][fitted == c].mean(0) for c in range(k)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-12)
    labels = (points @ centroids.T).argmax(1)
    labels[fit] = fitted  # the fitted examples keep their clusters
    return _relabel(labels)


def elrea_artifact(
    features: torch.Tensor,
    labels: np.ndarray,
    projection: CountSketch,
    experts: Any,
) -> ElreaArtifact:
    """The artifact of a clustering: centroids (the base adapter's: the mean of all features),
    and per member the mean and standard deviation of the training features' cosine to it."""
    groups = [torch.ones(len(features), dtype=torch.bool)]
    groups += [torch.from_numpy(labels == c) for c in range(int(labels.max()) + 1)]
    centroids = torch.nn.functional.normalize(
        torch.stack([features[group].mean(0) for group in groups]), dim=1
    )
    similarity = features @ centroids.T
    return ElreaArtifact(
        expert_names=experts.names,
        base_expert=BASE,
        centroids=centroids,
        similarity_mean=similarity.mean(0),
        similarity_std=similarity.std(0, correction=0),
        projection=projection,
        gradient_modules=tuple(sorted(experts.modules)),
        gradient_dim=gradient_dim(experts, BASE),
    )


def _record(example: Example) -> dict[str, Any]:
    if example.messages is not None:
        return {"messages": list(example.messages)}
    return {"prompt": example.prompt, "response": example.response}


@dataclass(frozen=True)
class _Training:
    """How the build trains (base adapter and experts alike) and where trained experts land."""

    base_model: Any
    repo_id: str
    registry: Registry
    options: dict[str, Any]  # train_experts' keywords

    def run(self, data: dict[str, list], scratch: Path, **extra: Any) -> dict[str, Expert]:
        """Train one expert per ``name -> records`` (the name is also its card's task)."""
        return _train_clusters(
            {name: [name] for name in data},
            data,
            self.base_model,
            scratch,
            self.repo_id,
            self.registry,
            {**self.options, **extra},
        )


def _check_request(registry, repo_id, clustering, threshold, counts) -> None:
    """Refuse what would fail only after hours of training."""
    if clustering not in CLUSTERINGS:
        raise TrainingError(f"unknown clustering {clustering!r}", hint=f"use one of {CLUSTERINGS}")
    if not threshold > 0:
        raise TrainingError(f"the BIRCH threshold must be positive, got {threshold}")
    for name, (value, least) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TrainingError(f"{name} must be at least {least} (an integer), got {value!r}")
    require_new_library(registry, repo_id)


def build_elrea_library(
    data: DataSource,
    registry: Registry,
    repo_id: str,
    *,
    base_model: Any,
    k: int,
    tokenizer: Any = None,
    config: TrainConfig | None = None,
    expert_config: TrainConfig | None = None,
    clustering: str = "birch",
    fit_examples: int = 5000,
    threshold: float = 0.3,
    projection_dim: int = 8192,
    projection_seed: int = 0,
    feature_batch_size: int = 8,
    seed: int = 0,
    backend: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    description: str = "",
    progress: bool | None = None,
) -> Library:
    """Build and publish an ELREA library of ``k`` gradient-cluster experts on ``data``.

    ``config`` trains the base adapter, ``expert_config`` (default: ``config``) the experts,
    which continue from it on ``backend`` (a Ray cluster at ``address`` pushes them to
    ``registry``). See the module for the steps; route the result with
    ``route(model, library, "elrea")``.
    """
    settings = {
        "k": (k, 1),
        "fit_examples": (fit_examples, 1),
        "projection_dim": (projection_dim, 1),
        "feature_batch_size": (feature_batch_size, 1),
        "seed": (seed, 0),
        "projection_seed": (projection_seed, 0),
    }
    _check_request(registry, repo_id, clustering, threshold, settings)
    config = config or TrainConfig()
    examples = load_examples(data)
    if not 1 <= k <= len(examples):
        raise TrainingError(
            f"cannot make {k} clusters of {len(examples)} examples",
            hint=f"pick k from 1 to {len(examples)}",
        )
    model, tokenizer = load_base(base_model, tokenizer)
    prompts = prompt_ids(examples, tokenizer, max_length=context_length(model.config, config))
    projection = CountSketch(projection_dim, projection_seed)
    records = [_record(example) for example in examples]
    options = dict(
        seed=seed, tokenizer=tokenizer, backend=backend, address=address, num_cpus=num_cpus,
        progress=progress,
    )  # fmt: skip
    training = _Training(model if address is None else base_model, repo_id, registry, options)
    with tempfile.TemporaryDirectory(prefix="quiver-elrea-") as scratch_dir:
        scratch = Path(scratch_dir)
        base = training.run({BASE: records}, scratch, config=config)[BASE]
        features = gradient_features(
            model, base.path, prompts, projection, pad_id=_pad_id(tokenizer),
            batch_size=feature_batch_size, progress=progress,
        )  # fmt: skip
        labels = cluster_features(
            features, k, method=clustering, fit_examples=fit_examples, threshold=threshold,
            seed=seed,
        )  # fmt: skip
        clusters = {
            f"cluster-{c}": [records[i] for i in np.flatnonzero(labels == c)] for c in range(k)
        }
        experts = training.run(
            clusters, scratch, config=expert_config or config, init_adapter=base.path
        )
        build = {
            "method": "elrea",
            "k": k,
            "clustering": clustering,
            "fit_examples": min(fit_examples, len(examples)),
            "projection": {"kind": "countsketch", "dim": projection_dim, "seed": projection_seed},
            "examples": len(examples),
            "cluster_sizes": {name: len(members) for name, members in clusters.items()},
            "seed": seed,
        }
        base_name = getattr(base_model, "name_or_path", None) or str(base_model)
        members = {BASE: base, **experts}
        stacked = load_experts({name: e.path for name, e in members.items()}, dtype=torch.float32)
        artifact = elrea_artifact(features, labels, projection, stacked)
        return Library.create(
            registry,
            repo_id,
            base_model=base_name,
            description=description
            or f"ELREA library: a base adapter and {k} experts on gradient clusters "
            f"({clustering}) of {len(examples)} examples.",
            build=build,
            experts=members,
            artifacts={ARTIFACT_NAME: artifact.save(scratch / f"{ARTIFACT_NAME}.safetensors")},
        )
