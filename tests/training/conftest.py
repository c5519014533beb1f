"""Fixtures of the training tests: a tiny Llama and the offline tokenizer."""

import pytest

from quiver.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def model():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 2 CPUs for the session (Ray takes seconds to start)."""
    ray = pytest.importorskip("ray")
    ray.shutdown()  # one an earlier test's train_experts(backend="ray") left up: ours has 2 CPUs
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
