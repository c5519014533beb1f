"""The Registry tab: pick a registry and token; search experts and libraries; read a card; pull."""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from quiver.app.browse import FILE_COLUMNS, SEARCH_COLUMNS, card_markdown, pull_expert, search_rows
from quiver.app.errors import readable_errors
from quiver.errors import InvalidInputError
from quiver.registry import LocalRegistry, Registry, open_registry

REGISTRY_INFO = "Empty: the local store ($QUIVER_HOME). Or 'hf', a Hub URL, a folder."
TQDM = gr.Progress(track_tqdm=True)  # a handler's default: pulls show their progress in the page


def registry_of(spec: str | None, token: str | None) -> Registry:
    """The registry a session chose (a Registry object is cheap: no request is made here). On a
    shared Space, visitors may not open folders of the server's disk as registries. (A page
    sends None for a textbox nobody has typed in.)"""
    spec, token = (spec or "").strip(), (token or "").strip()
    is_folder = spec and spec != "hf" and not spec.startswith(("http://", "https://"))
    if os.environ.get("SPACE_ID") and is_folder and spec != LocalRegistry().location:
        raise InvalidInputError(
            f"{spec!r} is a folder, and this app runs on a shared Space",
            hint="use 'hf', a Hub URL, or leave it empty for the Space's own store",
        )
    return open_registry(spec or None, token=token or None)


@dataclass
class RegistryTab:
    spec: gr.Textbox
    token: gr.Textbox
    chosen: gr.Dropdown  # experts chosen for composing a library


def registry_tab(default_spec: str | None) -> RegistryTab:
    with gr.Row():
        spec = gr.Textbox(default_spec or "", label="Registry", info=REGISTRY_INFO, scale=3)
        token = gr.Textbox(
            "", label="Token", type="password", info="For private repos and pushing.", scale=2
        )
    with gr.Row():
        base_model = gr.Textbox("", label="Base model", placeholder="e.g. meta-llama/Llama-3.2-1B")
        task = gr.Textbox("", label="Task")
        tag = gr.Textbox("", label="Tag")
        query = gr.Textbox("", label="Text")
        kind = gr.Radio(
            [("Any", ""), ("Experts", "expert"), ("Libraries", "library")], value="", label="Kind"
        )
    search = gr.Button("Search", variant="primary")
    results = gr.Dataframe(headers=SEARCH_COLUMNS, interactive=False, label="Results")
    chosen = gr.Dropdown(
        [],
        multiselect=True,
        allow_custom_value=True,
        label="Experts to compose a library from (Library tab)",
        info="Pick from the results, or type repo ids.",
    )
    with gr.Row():
        repo = gr.Textbox(
            "", label="Repo", placeholder="namespace/name, or pick a row above", scale=3
        )
        show = gr.Button("Show card", scale=1)
        pull = gr.Button("Pull", scale=1)
    with gr.Row():
        card = gr.Markdown()
        files = gr.Dataframe(headers=FILE_COLUMNS, interactive=False, label="Files")

    @readable_errors
    def run_search(spec_value, token_value, base_model, task, tag, query, kind):
        rows = search_rows(
            registry_of(spec_value, token_value),
            base_model=base_model,
            task=task,
            tag=tag,
            query=query,
            kind=kind,
        )
        if not rows:
            gr.Info("Nothing matches: loosen the filters.")
        experts = [row[0] for row in rows if row[1] == "expert"]
        return rows, gr.update(choices=experts, value=[])

    def pick(event: gr.SelectData) -> str:
        return event.row_value[0]

    @readable_errors
    def pull_files(spec_value, token_value, repo_id, progress=TQDM):
        _, text, rows = pull_expert(registry_of(spec_value, token_value), repo_id)
        return text, rows

    search.click(
        run_search,
        [spec, token, base_model, task, tag, query, kind],
        [results, chosen],
        api_name="search",
    )
    results.select(pick, None, repo, api_visibility="private")
    show.click(
        readable_errors(lambda s, t, r: card_markdown(registry_of(s, t), r)),
        [spec, token, repo],
        card,
        api_name="card",
    )
    pull.click(pull_files, [spec, token, repo], [card, files], api_name="pull")
    return RegistryTab(spec, token, chosen)
