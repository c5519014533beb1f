"""The app's fixtures: the demo library in this test session's local store; per module, one engine
on it (tiny model, loaded in well under a second) and the app served on 127.0.0.1 around it."""

import pytest

from quiver.app import ChatEngine, ensure_demo_library, serve
from quiver.registry import LocalRegistry


@pytest.fixture(scope="session")
def local_registry():
    """The local store under this session's $QUIVER_HOME, with the demo library installed."""
    registry = LocalRegistry()
    ensure_demo_library(registry)
    return registry


@pytest.fixture(scope="module")
def engine(local_registry):
    from quiver.app.demo import DEMO_LIBRARY

    return ChatEngine(local_registry, DEMO_LIBRARY)


@pytest.fixture(scope="module")
def app(engine):
    """The app on a free port of 127.0.0.1; ``app.local_url`` is its address."""
    served = serve(engine=engine)
    yield served
    served.close()
