import pytest

from quiver.testing import make_random_expert, tiny_model


@pytest.fixture
def expert_paths(tmp_path):
    """Factory: ``n`` random experts for ``model`` as PEFT folders ``e0..e{n-1}``."""

    def make(model, n=5, **options):
        return [make_random_expert(model, tmp_path / f"e{i}", seed=i, **options) for i in range(n)]

    return make


@pytest.fixture
def llama():
    return tiny_model("llama")
