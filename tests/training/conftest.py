"""Fixtures of the training tests: a tiny Llama and the offline tokenizer."""

import pytest

from quiver.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()
