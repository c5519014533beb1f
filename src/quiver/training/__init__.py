"""Build libraries: train LoRA experts (one or many, locally or on Ray), cluster them with MBC,
and turn the clusters into a new library; or cluster training examples by their gradients and
train an ELREA library."""

from quiver.training.build import build_mbc_library
from quiver.training.data import DataSource, Example, load_examples
from quiver.training.elrea import build_elrea_library
from quiver.training.fanout import TrainResult, train_experts
from quiver.training.mbc import Clustering, cluster_experts, suggest_k
from quiver.training.merge import MERGES, merged_factors, write_merged_expert
from quiver.training.trainer import (
    TrainConfig,
    TrainingData,
    evaluate,
    load_base,
    prepare_data,
    train_expert,
)

__all__ = [
    "MERGES",
    "Clustering",
    "DataSource",
    "Example",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "build_elrea_library",
    "build_mbc_library",
    "cluster_experts",
    "evaluate",
    "load_base",
    "load_examples",
    "merged_factors",
    "prepare_data",
    "suggest_k",
    "train_expert",
    "train_experts",
    "write_merged_expert",
]
