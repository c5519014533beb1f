"""Repos: create, delete, settings, listing and search, info at a revision, card validation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from quiver.errors import AlreadyExistsError
from quiver.server.deps import (
    PLURALS,
    Caller,
    Key,
    Options,
    ReadableRepo,
    Store,
    WritableRepo,
    Writer,
    check_namespace,
    repo_url,
    writable_repo,
)
from quiver.server.errors import NotSupported
from quiver.server.responses import flag_query, int_query, paginate, repo_info
from quiver.server.schemas import RepoBody, SettingsBody, YamlBody
from quiver.store import REPO_TYPES, RepoKey, parse_front_matter

router = APIRouter()
_SORT_KEYS = ("createdAt", "lastModified", "downloads", "likes")
_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def _body_key(body: RepoBody, writer: Writer) -> RepoKey:
    """The repo a create/delete body names (``organization`` defaults to the caller)."""
    repo_type = body.type or "model"
    if repo_type not in REPO_TYPES:
        raise NotSupported(f"the repo type {repo_type!r}")
    return RepoKey(repo_type, body.organization or writer.user, body.name)


# Routes that touch SQLite are plain functions, run in the thread pool, so a writer waiting for the
# database lock never stalls the event loop; FastAPI parses and validates their bodies beforehand.
@router.post("/api/repos/create")
def create_repo(request: Request, body: RepoBody, writer: Writer, store: Store) -> JSONResponse:
    """A new repo whose ``main`` starts with a ``.gitattributes`` commit, as on the Hub."""
    key = _body_key(body, writer)
    check_namespace(writer, key.namespace)
    url = repo_url(request, key)
    try:
        with store.staging() as staging:
            attributes = staging.add_bytes(".gitattributes", _GITATTRIBUTES)
            private = body.visibility == "private" or bool(body.private)
            store.create_repo(key, private=private, author=writer.user, files=[attributes])
    except AlreadyExistsError as error:
        # exist_ok=True in the client relies on the url of the existing repo in the 409 answer.
        existing = store.get_repo(key)
        url = repo_url(request, existing.key) if existing else url
        return JSONResponse({"error": str(error), "url": url}, 409, {"X-Error-Message": str(error)})
    return JSONResponse({"url": url, "name": key.id, "id": key.id})


@router.delete("/api/repos/delete")
def delete_repo(body: RepoBody, writer: Writer, store: Store) -> dict[str, Any]:
    key = _body_key(body, writer)
    writable_repo(store, key, writer)
    store.delete_repo(key)
    return {}


@router.put("/api/{kind}/{namespace}/{name}/settings")
def update_settings(key: Key, caller: Caller, store: Store, body: SettingsBody) -> dict:
    writable_repo(store, key, caller)
    if body.gated not in (None, False):
        raise NotSupported("gating a repo")
    private = body.private if body.visibility is None else body.visibility == "private"
    if private is not None:
        store.set_private(key, private)
    return {}


@router.get("/api/{kind}/{namespace}/{name}/auth-check")
def auth_check(repo: ReadableRepo) -> dict:
    """``HfApi.auth_check``: 200 if the caller may read the repo (else: not found)."""
    return {}


@router.get("/api/{kind}/{namespace}/{name}/auth-check/write")
def auth_check_write(repo: WritableRepo) -> dict:
    """``HfApi.auth_check(write=True)``: 200 if the caller may also write to it."""
    return {}


@router.post("/api/validate-yaml")
def validate_yaml(body: YamlBody) -> JSONResponse:
    try:
        parse_front_matter(body.content)
    except Exception as error:  # any YAML error is the user's, reported back as the Hub does
        return JSONResponse({"errors": [{"message": str(error)}], "warnings": []}, 400)
    return JSONResponse({"errors": [], "warnings": []})


@router.get("/api/{kind}")
def list_repos(request: Request, kind: str, caller: Caller, store: Store, options: Options):
    """``list_models``/``list_datasets``: search, author and tag filters, sort, expand, pages."""
    if kind not in PLURALS:
        raise NotSupported(f"the repo type {kind!r}")
    query = request.query_params
    wanted = query.getlist("filter") + (
        [query["pipeline_tag"]] if query.get("pipeline_tag") else []
    )
    expand = query.getlist("expand") or query.getlist("expand[]")
    full = flag_query(request, "full")
    with_card = full or flag_query(request, "cardData") or bool(expand)
    found = store.search(
        PLURALS[kind],
        tags=wanted,
        author=query.get("author") or None,
        id_contains=query.get("search"),
        visible_to=caller.namespaces if caller else (),
    )
    items = [
        repo_info(store, repo, head, card=with_card, files=full or bool(expand))
        for repo, head in found
    ]
    sort = query.get("sort")
    if sort in _SORT_KEYS:
        # Newest (or most) first, as on the Hub; the 2.x client sends no direction.
        items.sort(key=lambda item: item[sort], reverse=query.get("direction") != "1")
    if expand:
        items = [{k: v for k, v in i.items() if k in {"id", "_id", *expand}} for i in items]
    limit = int_query(request, "limit", options.page_size)
    return paginate(request, items, page_size=min(limit, options.page_size))


@router.get("/api/{kind}/{namespace}/{name}")
def get_repo_info(repo: ReadableRepo, store: Store) -> dict:
    return repo_info(store, repo, store.commit_info(repo, store.resolve(repo, "main")))


@router.get("/api/{kind}/{namespace}/{name}/revision/{revision}")
def get_repo_info_at(repo: ReadableRepo, store: Store, revision: str) -> dict:
    return repo_info(store, repo, store.commit_info(repo, store.resolve(repo, revision)))
