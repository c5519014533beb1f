"""The whole app: three tabs around one shared ``ChatEngine``."""

from __future__ import annotations

import gradio as gr

from quiver.app.chat_tab import chat_tab
from quiver.app.demo import DEMO_LIBRARY, DEMO_PROMPTS, ensure_demo_library
from quiver.app.engine import ChatEngine
from quiver.app.engine_process import EngineProcess
from quiver.app.library_tab import library_tab
from quiver.app.registry_tab import registry_tab
from quiver.registry import open_registry

INTRO = (
    "# Quiver\n"
    "Chat with a base model routed over a library of LoRA experts and see which experts every "
    "token went to; browse a registry; compose, share and push libraries."
)


def open_engine(
    registry: str | None = None,
    library: str | None = None,
    *,
    token: str | None = None,
    own_process: bool = False,
    threads: int | None = None,
) -> ChatEngine | EngineProcess:
    """The chat's model: ``library`` of ``registry``, or without a library the demo library of
    the local store (installed on first use); ``own_process``: in a process of its own (the
    app's choice: there the model never waits for the GIL behind Gradio's threads), with
    ``threads`` torch threads (default: torch's choice, one for the demo)."""
    if library:
        where, library_id = open_registry(registry, token=token), library
    else:
        where = open_registry(None)
        library_id = ensure_demo_library(where)
    if not own_process:
        return ChatEngine(where, library_id)
    # The demo's 0.88M model streams fastest on one thread: with torch's two here, beside
    # Gradio, 1.63x slower than alone against 0.95x (benchmarks/app_process.py).
    return EngineProcess(where, library_id, threads=threads or (None if library else 1))


def create_app(
    registry: str | None = None,
    library: str | None = None,
    *,
    token: str | None = None,
    concurrency: int = 2,
    engine: ChatEngine | EngineProcess | None = None,
) -> gr.Blocks:
    """The Gradio app, chatting with ``engine`` (default: ``open_engine(registry, library)``, in
    a process of its own).
    ``registry`` is also where the Registry tab starts; ``concurrency`` bounds how many chats
    the queue runs at once."""
    engine = engine or open_engine(registry, library, token=token, own_process=True)
    with gr.Blocks(title="Quiver") as app:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                examples = DEMO_PROMPTS if engine.library.repo_id == DEMO_LIBRARY else None
                chat = chat_tab(engine, concurrency, examples)
            with gr.Tab("Registry", id="registry"):
                registries = registry_tab(registry)
            with gr.Tab("Library", id="library"):
                library_tab(engine, registries, chat)
        app.load(lambda: chat.refresh(engine), None, chat.outputs, api_visibility="private")
    app.queue(default_concurrency_limit=concurrency)
    return app


def serve(
    registry: str | None = None,
    library: str | None = None,
    *,
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    engine: ChatEngine | EngineProcess | None = None,
) -> gr.Blocks:
    """Build the app and start serving it in the background; ``app.local_url`` (and
    ``app.share_url``) say where; ``app.block_thread()`` waits until Ctrl+C."""
    app = create_app(registry, library, token=token, engine=engine)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        theme=gr.themes.Soft(),
    )
    return app
