"""The app's fixtures: the demo library in this test session's local store, and one engine on it
per module (tiny model, loaded in well under a second)."""

import pytest

from quiver.app import ChatEngine, ensure_demo_library
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
