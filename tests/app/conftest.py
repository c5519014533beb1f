"""The app's fixtures: the demo library in this test session's local store, and a library of random
experts beside it (on a tiny random Llama that never ends an answer early, for long streams); per
module, one engine (tiny models load in well under a second) and the app served on 127.0.0.1
around it. A module that overrides ``engine`` serves its own."""

import pytest
from app_helpers import RANDOM_BASE_MODEL, RANDOM_EXPERTS, RANDOM_LIBRARY

from quiver.app import ChatEngine, ensure_demo_library, serve
from quiver.app.demo import install_random_library
from quiver.registry import LocalRegistry
from quiver.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def local_registry():
    """The local store under this session's $QUIVER_HOME, with the demo library installed."""
    registry = LocalRegistry()
    ensure_demo_library(registry)
    return registry


@pytest.fixture(scope="session")
def random_library(local_registry) -> str:
    """Four random experts on a random Llama of 512 positions that cannot say end-of-text."""
    model = tiny_model("llama", seed=0, hidden=64, layers=4, max_position_embeddings=512)
    model.name_or_path = RANDOM_BASE_MODEL
    tokenizer = tiny_tokenizer()
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    install_random_library(local_registry, RANDOM_LIBRARY, model, tokenizer, experts=RANDOM_EXPERTS)
    return RANDOM_LIBRARY


@pytest.fixture(scope="module")
def engine(local_registry):
    from quiver.app.demo import DEMO_LIBRARY

    return ChatEngine(local_registry, DEMO_LIBRARY)


@pytest.fixture(scope="module")
def random_engine(local_registry, random_library):
    return ChatEngine(local_registry, random_library)


@pytest.fixture(scope="module")
def app(engine):
    """The app on a free port of 127.0.0.1; ``app.local_url`` is its address."""
    served = serve(engine=engine)
    yield served
    served.close()
