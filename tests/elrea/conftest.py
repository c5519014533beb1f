"""Fixtures of the ELREA tests: planted data of three kinds and an ELREA library built on it."""

import pytest
from elrea_helpers import FAST, KINDS, planted_pairs

from quiver.registry import LocalRegistry
from quiver.testing import tiny_model, tiny_tokenizer
from quiver.training import build_elrea_library


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """An ELREA library (k=3) built on 12 examples of each kind, and the kinds in data order."""
    registry = LocalRegistry(tmp_path_factory.mktemp("elrea-store"))
    truth = [kind for kind in range(len(KINDS)) for _ in range(12)]
    pairs = planted_pairs(truth, seed=0)
    library = build_elrea_library(
        pairs, registry, "me/planted", base_model=tiny_model("llama", seed=0),
        tokenizer=tiny_tokenizer(), k=3, config=FAST, projection_dim=256, progress=False,
    )  # fmt: skip
    return registry, library, pairs, truth
