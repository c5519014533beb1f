"""The Gradio app: browse a registry, compose a library, chat with the routed model and see the
routing. ``create_app()`` builds it (a ``gr.Blocks``), ``serve()`` runs it; ``quiver app`` is the
command line."""

from quiver.app.demo import ensure_demo_library
from quiver.app.engine import ChatEngine, GenerationSettings, StrategySpec, TokenRouting
from quiver.app.engine_process import EngineProcess
from quiver.app.ui import create_app, open_engine, serve

__all__ = [
    "ChatEngine",
    "EngineProcess",
    "GenerationSettings",
    "StrategySpec",
    "TokenRouting",
    "create_app",
    "ensure_demo_library",
    "open_engine",
    "serve",
]
