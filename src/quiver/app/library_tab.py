"""The Library tab: open or compose a library; see its experts, how alike they are and their MBC
clusters; store Arrow prototypes; push it; chat with it."""

from __future__ import annotations

import os

import gradio as gr

from quiver.app.browse import library_markdown
from quiver.app.chat_tab import MODEL, ChatTab
from quiver.app.engine_process import Engine
from quiver.app.errors import readable_errors
from quiver.app.libraries import (
    cluster_library,
    cluster_rows,
    compose,
    expert_rows,
    store_prototypes,
)
from quiver.app.registry_tab import REGISTRY_INFO, TQDM, RegistryTab, registry_of
from quiver.registry import Library

EXPERT_COLUMNS = ["expert", "source", "weights sha256"]
CLUSTER_COLUMNS = ["cluster", "experts"]
LOCAL = "local store"
MBC_INFO = (
    "MBC groups the experts by the cosine similarity of their weight updates (k-means on its "
    "rows); 0 clusters: as many as the silhouette suggests."
)


def _clusters(library: Library, k: int = 0) -> tuple:
    """The similarity heat-map ordered by MBC cluster, and the clusters (none under 2 experts)."""
    if len(library.names) < 2:
        return None, []
    clustering = cluster_library(library, k)
    how = "" if k else " (suggested)"
    title = f"Weight updates' cosine; MBC k={clustering.k}{how}"
    return clustering.figure(title=title), cluster_rows(clustering)


def _view(library: Library) -> tuple:
    """The summary, the experts table, the similarity heat-map and the MBC clusters."""
    return library_markdown(library), expert_rows(library), *_clusters(library)


def library_tab(engine: Engine, registries: RegistryTab, chat: ChatTab) -> None:
    gr.Markdown(
        "Open a library from the registry chosen in the Registry tab, or compose one from the "
        "experts chosen there."
    )
    with gr.Row():
        repo = gr.Textbox("", label="Library", placeholder="namespace/name", scale=3)
        where = gr.Textbox("", label="In registry", interactive=False, scale=2)
        open_button = gr.Button("Open", variant="primary", scale=1)
    with gr.Accordion("Compose a new library", open=False):
        with gr.Row():
            new_repo = gr.Textbox("", label="New library", placeholder="namespace/name")
            target = gr.Radio(
                [LOCAL, "the registry of the Registry tab"], value=LOCAL, label="Create it in"
            )
        description = gr.Textbox("", label="Description")
        compose_button = gr.Button("Compose from the chosen experts")
    summary = gr.Markdown()
    with gr.Row():
        experts = gr.Dataframe(headers=EXPERT_COLUMNS, interactive=False, label="Experts")
        similarity = gr.Plot(show_label=False, elem_id="similarity")
    with gr.Row():
        with gr.Column(scale=1):
            k = gr.Number(0, precision=0, minimum=0, label="Number of clusters", info=MBC_INFO)
            cluster_button = gr.Button("Cluster")
        clusters = gr.Dataframe(
            headers=CLUSTER_COLUMNS,
            interactive=False,
            label="MBC clusters",
            scale=2,
            elem_id="clusters",
        )
    with gr.Row():
        prototypes_button = gr.Button("Compute and store Arrow prototypes")
        use_button = gr.Button("Chat with this library", variant="primary")
    with gr.Accordion("Push", open=False):
        with gr.Row():
            push_spec = gr.Textbox("hf", label="To registry", info=REGISTRY_INFO)
            push_token = gr.Textbox("", label="Token", type="password", info="With write access.")
            push_repo = gr.Textbox("", label="As", placeholder="namespace/name (default: same)")
        if os.environ.get("SPACE_ID"):  # on a Hugging Face Space, log in instead of a token
            gr.LoginButton()
        push_button = gr.Button("Push")
    views = [summary, experts, similarity, clusters]

    def library_registry(where_spec, spec, token):
        """The open library's registry, with the session's token if it is the Registry tab's."""
        chosen = registry_of(spec, token)
        return chosen if chosen.location == where_spec else registry_of(where_spec, "")

    @readable_errors
    def open_library(repo_id, spec, token, progress=TQDM):
        library = Library.pull(registry_of(spec, token), repo_id.strip())
        return library.registry.location, *_view(library)

    @readable_errors
    def compose_library(new_id, into, text, chosen, spec, token, progress=TQDM):
        source = registry_of(spec, token)
        destination = registry_of("", "") if into == LOCAL else source
        library = compose(destination, new_id.strip(), source, list(chosen or []), text)
        return library.repo_id, destination.location, *_view(library)

    @readable_errors
    def cluster(repo_id, where_spec, spec, token, count):
        library = Library.open(library_registry(where_spec, spec, token), repo_id.strip())
        return _clusters(library, int(count or 0))

    @readable_errors
    def add_prototypes(repo_id, where_spec, spec, token):
        registry = library_registry(where_spec, spec, token)
        library = store_prototypes(Library.open(registry, repo_id.strip()))
        gr.Info(f"Stored Arrow prototypes in {library.repo_id}@{library.commit[:10]}")
        return _view(library)[0]

    @readable_errors
    def push(
        repo_id, where_spec, spec, token, to_spec, to_token, as_repo, oauth: gr.OAuthToken | None
    ):
        library = Library.open(library_registry(where_spec, spec, token), repo_id.strip())
        to_token = to_token.strip() or (oauth.token if oauth else "")
        pushed = library.push(registry_of(to_spec, to_token), as_repo.strip() or None)
        return f"Pushed **{pushed.repo_id}** @ `{pushed.commit[:10]}` to {pushed.registry.location}"

    @readable_errors
    def use(repo_id, where_spec, spec, token, progress=TQDM):
        engine.load_library(library_registry(where_spec, spec, token), repo_id.strip())
        gr.Info(f"The chat now uses {engine.library.repo_id}.")
        return chat.refresh(engine)

    tab_registry = [registries.spec, registries.token]
    open_button.click(open_library, [repo, *tab_registry], [where, *views], api_name="open_library")
    compose_button.click(
        compose_library,
        [new_repo, target, description, registries.chosen, *tab_registry],
        [repo, where, *views],
        api_name="compose",
    )
    cluster_button.click(
        cluster, [repo, where, *tab_registry, k], [similarity, clusters], api_name="cluster"
    )
    prototypes_button.click(
        add_prototypes, [repo, where, *tab_registry], summary, api_name="store_prototypes"
    )
    push_button.click(
        push,
        [repo, where, *tab_registry, push_spec, push_token, push_repo],
        summary,
        api_name="push_library",
    )
    use_button.click(
        use,
        [repo, where, *tab_registry],
        chat.outputs,
        api_name="use_library",
        concurrency_id=MODEL,
    )
