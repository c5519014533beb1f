"""Build libraries: train LoRA experts (one or many, locally or on Ray), cluster them with MBC,
and turn the clusters into a new library."""

from quiver.training.data import DataSource, Example, load_examples
from quiver.training.trainer import TrainConfig, evaluate, load_base, train_expert

__all__ = [
    "DataSource",
    "Example",
    "TrainConfig",
    "evaluate",
    "load_base",
    "load_examples",
    "train_expert",
]
