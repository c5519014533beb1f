"""MBC, model-based clustering: group LoRA experts by their weights (arXiv 2405.11157).

Two embeddings of an expert, both ending in an expert x expert cosine matrix whose rows k-means
clusters (k-means++, ``n_init=10``, a fixed seed), as in the paper:

- ``"parameters"``, the paper's: every A and B tensor flattened into one vector, entries at or
  below a magnitude quantile zeroed, TruncatedSVD to at most 64 dimensions, rows L2-normalised.
  It compares *parameters*, so it only works when the experts started from one shared LoRA init
  (ARI 1.0 measured on a toy world); from independent inits, the normal case for a pulled set, A
  barely leaves its random init and the clusters come out at random (ARI 0.2-0.4).
- ``"update"`` (the default): the cosine of the updates ``s B A``, pooled over all modules,
  ``<B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T))``, from r x r products (never the dense
  matrices). It does not depend on how an update is factored, so it clusters experts from
  independent inits (ARI 1.0 on the same toy world). Use ``"parameters"`` only for experts
  trained with one ``TrainConfig.init_seed`` (Quiver's default within one ``train_experts`` call).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from quiver.errors import IncompatibleExpertError, InvalidAdapterError, TrainingError
from quiver.registry.adapter import read_adapter_config
from quiver.routing import ExpertSet, load_experts
from quiver.routing.experts import ExpertSource, resolve_expert_paths

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EMBEDDINGS = ("update", "parameters")
MAX_COMPONENTS = 64


def _check_one_base_model(paths: Mapping[str, Path]) -> str:
    """All experts must be LoRA folders adapting one base model; return its name."""
    bases = {}
    for name, folder in paths.items():
        config = read_adapter_config(folder, f"expert {name!r} ({folder})")
        bases[name] = config.get("base_model_name_or_path") or "unknown"
    first = next(iter(bases))
    for name, base in bases.items():
        if base != bases[first]:
            raise IncompatibleExpertError(
                f"expert {name!r} adapts {base!r} but {first!r} adapts {bases[first]!r}",
                hint="cluster experts of one base model at a time",
                expert=name,
            )
    return bases[first]


def load_for_clustering(source: ExpertSource | ExpertSet) -> ExpertSet:
    """Stack a library's (or folders') experts, refusing mixed base models, modules or shapes."""
    if isinstance(source, ExpertSet):
        return source
    paths = resolve_expert_paths(source)
    _check_one_base_model(paths)
    experts = load_experts(paths, dtype=torch.float32)
    for stack in experts.modules.values():  # one pass: a NaN would poison every similarity
        finite = torch.isfinite(stack.A).flatten(1).all(1) & torch.isfinite(stack.B).flatten(1).all(
            1
        )
        if not finite.all():
            name = experts.names[int((~finite).nonzero()[0])]
            raise InvalidAdapterError(
                f"expert {name!r} ({paths[name]}) holds NaN or infinite weights",
                hint="its training diverged: leave it out, or retrain it at a lower learning rate",
                expert=name,
            )
    return experts


def update_similarity(experts: ExpertSet) -> np.ndarray:
    """Cosine between the experts' updates ``s B A``, all modules pooled, exactly.

    Per module, one Gram matrix of all B's and one of all A's (``[E r, E r]``, plain GEMMs) give
    every ``trace((B_i^T B_j)(A_j A_i^T))`` at once; ranks zero-padded by the stacking add nothing.
    """
    count = len(experts.names)
    gram = torch.zeros(count, count, dtype=torch.float64)
    for stack in experts.modules.values():
        rank = stack.A.shape[1]
        lora_b = stack.scaled_B().double().permute(1, 0, 2).reshape(-1, count * rank)  # [out, E r]
        lora_a = stack.A.double().reshape(count * rank, -1)  # [E r, in]
        b_gram = (lora_b.T @ lora_b).reshape(count, rank, count, rank)  # B_i^T B_j
        a_gram = (lora_a @ lora_a.T).reshape(count, rank, count, rank)  # A_i A_j^T
        gram += torch.einsum(
            "iajb,iajb->ij", b_gram, a_gram
        )  # sum_ab (B_i^T B_j)_ab (A_i A_j^T)_ab
    empty = (gram.diagonal() <= 0).nonzero().flatten().tolist()
    if empty:  # its cosine to anything is undefined: it would be clustered at random
        name = experts.names[empty[0]]
        raise InvalidAdapterError(
            f"expert {name!r} changes nothing: its update s B A is zero (an untrained LoRA, "
            "whose B is still PEFT's zero init)",
            hint="leave it out, train it, or cluster by embedding='parameters'",
            expert=name,
        )
    norms = gram.diagonal().sqrt()
    return (gram / norms[:, None] / norms[None, :]).clamp(-1, 1).numpy()


def parameter_embedding(experts: ExpertSet, *, sparsity: float = 0.5, seed: int = 0) -> np.ndarray:
    """The paper's embedding: flattened A and B, magnitudes at or below the ``sparsity`` quantile
    zeroed (per expert), TruncatedSVD to at most 64 dimensions, L2-normalised rows."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    experts.require_uniform_rank("the parameter embedding")
    rows = torch.cat(
        [torch.cat([s.A.flatten(1), s.B.flatten(1)], dim=1) for s in experts.modules.values()],
        dim=1,
    ).numpy()
    if sparsity > 0:
        magnitudes = np.abs(rows)
        thresholds = np.quantile(magnitudes, sparsity, axis=1, keepdims=True)
        rows = np.where(magnitudes > thresholds, rows, 0.0)
    components = min(MAX_COMPONENTS, rows.shape[0], rows.shape[1] - 1)
    reduced = TruncatedSVD(n_components=components, random_state=seed).fit_transform(rows)
    return normalize(reduced)


def parameter_similarity(experts: ExpertSet, *, sparsity: float = 0.5, seed: int = 0):
    embedded = parameter_embedding(experts, sparsity=sparsity, seed=seed)
    return np.clip(embedded @ embedded.T, -1.0, 1.0)


def _kmeans(similarity: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit_predict(
        similarity
    )
    # Number clusters by first appearance, so names do not depend on k-means' internal order.
    order = {label: i for i, label in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[label] for label in labels.tolist()])


def suggest_k(similarity: np.ndarray, *, seed: int = 0, max_k: int | None = None) -> int:
    """The k in 2..n-1 whose k-means clustering of the similarity rows has the best silhouette
    (1 for fewer than 3 experts, or when every expert is alike)."""
    from sklearn.metrics import silhouette_score

    count = similarity.shape[0]
    best_k, best_score = 1, -1.0
    for k in range(2, min(count - 1, max_k or count) + 1):
        labels = _kmeans(similarity, k, seed)
        if len(set(labels.tolist())) < 2:
            continue
        score = silhouette_score(similarity, labels)
        if score > best_score + 1e-9:
            best_k, best_score = k, score
    return best_k


@dataclass(frozen=True)
class Clustering:
    """MBC's answer: which cluster each expert is in, and the similarities that decided it."""

    names: tuple[str, ...]
    labels: tuple[int, ...]
    similarity: np.ndarray
    embedding: str
    seed: int

    @property
    def k(self) -> int:
        return len(set(self.labels))

    @property
    def clusters(self) -> dict[str, list[str]]:
        """``cluster-<i>`` -> its experts, clusters numbered by their first expert."""
        groups: dict[str, list[str]] = {}
        for name, label in zip(self.names, self.labels, strict=True):
            groups.setdefault(f"cluster-{label}", []).append(name)
        return groups

    def figure(self, *, title: str | None = None) -> Figure:
        """A heat-map of the similarity matrix, experts ordered by cluster with lines between
        the clusters (the values written in for up to 12 experts). A matplotlib ``Figure`` made
        without pyplot, so that threads (an app's sessions) can draw at once."""
        from matplotlib.figure import Figure

        order = np.argsort(np.array(self.labels), kind="stable")
        size = max(4.0, 0.28 * len(self.names) + 2)
        figure = Figure(figsize=(size + 1.2, size), layout="constrained")
        axes = figure.add_subplot()
        similarity = self.similarity[np.ix_(order, order)]
        image = axes.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1)
        labels = [self.names[i] for i in order]
        axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        axes.set_yticks(range(len(labels)), labels, fontsize=7)
        if len(labels) <= 12:
            for (i, j), value in np.ndenumerate(similarity):
                shown = f"{value:.2f}".replace("-0.00", "0.00")
                color = "white" if abs(value) > 0.6 else "black"
                axes.text(j, i, shown, ha="center", va="center", fontsize=7, color=color)
        sizes = np.bincount(np.array(self.labels))
        for edge in np.cumsum(sizes)[:-1]:
            axes.axhline(edge - 0.5, color="black", linewidth=1.5)
            axes.axvline(edge - 0.5, color="black", linewidth=1.5)
        figure.colorbar(image, ax=axes, label="cosine similarity")
        axes.set_title(title or f"MBC, {self.embedding} embedding, k={self.k}", fontsize=10)
        return figure

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """The heat-map of ``figure`` as a PNG."""
        path = Path(path)
        self.figure(title=title).savefig(path, dpi=120)
        return path


def cluster_experts(
    experts: ExpertSource | ExpertSet,
    *,
    k: int | None = None,
    embedding: str = "update",
    seed: int = 0,
    sparsity: float = 0.5,
) -> Clustering:
    """Cluster a set of experts of one base model (a ``Library``, ``name -> folder`` or folders)
    with MBC. ``k=None`` takes the silhouette's suggestion. See the module for the embeddings."""
    for what, value in (("k", k), ("seed", seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TrainingError(f"{what} must be an integer, got {value!r}")
    if embedding not in EMBEDDINGS:
        raise TrainingError(f"unknown embedding {embedding!r}", hint=f"use one of {EMBEDDINGS}")
    if not 0 <= sparsity < 1:
        raise TrainingError(f"sparsity must be in [0, 1), got {sparsity}")
    stacked = load_for_clustering(experts)
    count = len(stacked.names)
    if k is not None and not 1 <= k <= count:
        raise TrainingError(
            f"cannot make {k} clusters of {count} experts", hint=f"pick k from 1 to {count}"
        )
    if embedding == "update":
        similarity = update_similarity(stacked)
    else:
        similarity = parameter_similarity(stacked, sparsity=sparsity, seed=seed)
    k = k or suggest_k(similarity, seed=seed)
    labels = _kmeans(similarity, k, seed) if k > 1 else np.zeros(count, dtype=int)
    return Clustering(stacked.names, tuple(labels.tolist()), similarity, embedding, seed)
