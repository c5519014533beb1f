"""The ``elrea`` library artifact: what ELREA routing needs beyond the experts.

Per ensemble member (the base adapter and each cluster's expert), a unit centroid of the training
examples' gradient features (a cluster's mean; the base adapter's is the mean of all of them) and
the mean and standard deviation of the training features' cosine to it, which standardise a new
prompt's similarities; and the projection and gradient the features were made with, so routing
computes a prompt's feature exactly as the build did. One safetensors file: the tensors, and JSON
in its metadata (members, base member, projection kind, dimension and seed, the gradient's
modules and size), pinned by sha256 in ``library.json`` like any artifact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quiver.errors import IncompatibleExpertError, RoutingError
from quiver.fs import atomic_path
from quiver.routing.experts import ExpertSet
from quiver.routing.gradients import CountSketch

ARTIFACT_NAME = "elrea"
FORMAT = "quiver-elrea/1"
_BUILD_HINT = "build the library with `quiver library build-elrea` (build_elrea_library)"


def gradient_dim(experts: ExpertSet, base: str) -> int:
    """The size of the gradient with respect to expert ``base``'s factors: ``r * (in + out)``
    summed over its modules."""
    i = experts.index(base)
    return sum(s.ranks[i] * (s.A.shape[-1] + s.B.shape[1]) for s in experts.modules.values())


@dataclass(frozen=True)
class ElreaArtifact:
    """What ELREA routing needs beyond the experts: the members' centroids (unit rows, in
    ``expert_names`` order), the training similarities' mean and standard deviation per member,
    and the projection and gradient the features were made with."""

    expert_names: tuple[str, ...]
    base_expert: str
    centroids: torch.Tensor  # [E, dim]
    similarity_mean: torch.Tensor  # [E]
    similarity_std: torch.Tensor  # [E]
    projection: CountSketch
    gradient_modules: tuple[str, ...]
    gradient_dim: int

    def __post_init__(self) -> None:
        count, dim = len(self.expert_names), self.projection.dim
        shapes = (self.centroids.shape, self.similarity_mean.shape, self.similarity_std.shape)
        if shapes != ((count, dim), (count,), (count,)):
            raise RoutingError(
                f"the elrea artifact's tensors have shapes {[tuple(s) for s in shapes]}, not "
                f"{[(count, dim), (count,), (count,)]} for {count} experts",
                hint=_BUILD_HINT,
            )
        if self.base_expert not in self.expert_names:
            raise RoutingError(
                f"the elrea artifact's base expert {self.base_expert!r} is not among its experts",
                hint=_BUILD_HINT,
            )

    def standardised_similarity(self, features: torch.Tensor) -> torch.Tensor:
        """``z [rows, E]``: each feature's cosine to every centroid, standardised per member."""
        cosine = features.float() @ self.centroids.to(features.device).T
        mean, std = self.similarity_mean.to(cosine), self.similarity_std.to(cosine)
        return (cosine - mean) / std.clamp_min(1e-6)

    def check_matches(self, experts: ExpertSet) -> None:
        """Refuse an artifact made for other experts, or for another base adapter's gradient."""
        if set(self.expert_names) != set(experts.names):
            raise IncompatibleExpertError(
                f"the elrea artifact is for the experts {sorted(self.expert_names)}, the library "
                f"has {sorted(experts.names)}",
                hint="rebuild the library with build-elrea after changing its experts",
            )
        modules, dim = tuple(sorted(experts.modules)), gradient_dim(experts, self.base_expert)
        if (tuple(sorted(self.gradient_modules)), self.gradient_dim) != (modules, dim):
            raise IncompatibleExpertError(
                f"the elrea artifact's features are gradients of size {self.gradient_dim} over "
                f"{len(self.gradient_modules)} modules; the base expert "
                f"{self.base_expert!r} has {dim} over {len(modules)}",
                hint="rebuild the library with build-elrea",
                expert=self.base_expert,
            )

    def reordered(self, names: tuple[str, ...]) -> ElreaArtifact:
        """The same artifact with its members in ``names`` order (the routed experts')."""
        order = torch.tensor([self.expert_names.index(name) for name in names])
        return ElreaArtifact(
            names,
            self.base_expert,
            self.centroids[order],
            self.similarity_mean[order],
            self.similarity_std[order],
            self.projection,
            self.gradient_modules,
            self.gradient_dim,
        )

    def save(self, path: str | Path) -> Path:
        """Write the artifact as one safetensors file (JSON in its metadata), atomically."""
        path = Path(path)
        tensors = {
            "centroids": self.centroids.float().contiguous(),
            "similarity_mean": self.similarity_mean.float().contiguous(),
            "similarity_std": self.similarity_std.float().contiguous(),
        }
        metadata = {
            "quiver_artifact": ARTIFACT_NAME,
            "format": FORMAT,
            "experts": json.dumps(self.expert_names),
            "base_expert": self.base_expert,
            "projection": json.dumps(
                {"kind": "countsketch", "dim": self.projection.dim, "seed": self.projection.seed}
            ),
            "gradient": json.dumps({"modules": self.gradient_modules, "dim": self.gradient_dim}),
        }
        with atomic_path(path) as temp:
            save_file(tensors, str(temp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ElreaArtifact:
        """Read an artifact written by ``save``; a malformed one is a ``RoutingError``."""
        try:
            with safe_open(str(path), framework="pt") as stored:
                metadata = stored.metadata() or {}
                tensors = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118
            if metadata.get("format") != FORMAT:
                raise ValueError(f"its format is {metadata.get('format')!r}, not {FORMAT!r}")
            projection = json.loads(metadata["projection"])
            if projection.get("kind") != "countsketch":
                raise ValueError(f"unknown projection {projection.get('kind')!r}")
            gradient = json.loads(metadata["gradient"])
            return cls(
                tuple(json.loads(metadata["experts"])),
                metadata["base_expert"],
                tensors["centroids"],
                tensors["similarity_mean"],
                tensors["similarity_std"],
                CountSketch(int(projection["dim"]), int(projection["seed"])),
                tuple(gradient["modules"]),
                int(gradient["dim"]),
            )
        except RoutingError:
            raise
        except Exception as error:  # safetensors' own errors, JSON, missing keys or tensors
            raise RoutingError(
                f"{path} is not a readable elrea artifact: {error}", hint=_BUILD_HINT
            ) from error


def stored_artifact(source: object) -> ElreaArtifact:
    """The ``elrea`` artifact of a library (``artifact_path("elrea")``)."""
    artifact_path = getattr(source, "artifact_path", None)
    path = artifact_path(ARTIFACT_NAME) if callable(artifact_path) else None
    if path is None or not Path(path).is_file():
        what = getattr(source, "repo_id", None) or type(source).__name__
        raise RoutingError(
            f"{what} has no {ARTIFACT_NAME!r} artifact: ELREA routing needs its centroids",
            hint=_BUILD_HINT,
        )
    return ElreaArtifact.load(path)
