"""What routes ask for, declared once: the store, the options, the caller, and the repo a URL
names, readable or writable by that caller. FastAPI resolves each at most once per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from quiver.server.accounts import HubStore, Principal
from quiver.server.errors import Forbidden, NotSupported, Unauthorized
from quiver.server.options import HubOptions
from quiver.store import Repo, RepoKey, RepoNotFoundError

PLURALS = {"models": "model", "datasets": "dataset"}
INVALID_TOKEN = "Invalid credentials in Authorization header"


def get_store(request: Request) -> HubStore:
    return request.app.state.store


def get_options(request: Request) -> HubOptions:
    return request.app.state.options


Store = Annotated[HubStore, Depends(get_store)]
Options = Annotated[HubOptions, Depends(get_options)]


def get_caller(request: Request, store: Store) -> Principal | None:
    """The owner of the bearer token, or None for an anonymous request; a token that is not
    (or no longer) valid is refused, never mistaken for no token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not token or scheme.lower() != "bearer":
        return None
    found = store.authenticate(token.strip())
    if found is None:
        raise Unauthorized(INVALID_TOKEN)  # verbatim: the client tells it from a missing repo
    return found


Caller = Annotated[Principal | None, Depends(get_caller)]


def get_writer(caller: Caller) -> Principal:
    """The caller, who must hold a write token (whose namespaces are checked per repo)."""
    if caller is None:
        raise Unauthorized("You must be authenticated to write", hint="pass a write token")
    if not caller.write:
        raise Forbidden("This token is read-only", hint="create one with --write")
    return caller


Writer = Annotated[Principal, Depends(get_writer)]


def repo_key(kind: str, namespace: str, name: str) -> RepoKey:
    if kind not in PLURALS:
        raise NotSupported(f"the repo type {kind!r}")
    return RepoKey(PLURALS[kind], namespace, name)


def get_repo_key(request: Request, namespace: str, name: str) -> RepoKey:
    """The repo of the URL: ``/api/{kind}/{ns}/{name}/...``, or on the git side
    ``/{ns}/{name}/...`` for models and ``/datasets/{ns}/{name}/...`` for datasets."""
    kind = request.path_params.get("kind")
    if kind is None:
        kind = "datasets" if request.url.path.startswith("/datasets/") else "models"
    return repo_key(kind, namespace, name)


Key = Annotated[RepoKey, Depends(get_repo_key)]


def visible(repo: Repo | None, caller: Principal | None) -> bool:
    """Private repos are visible to their namespace only."""
    return repo is not None and (
        not repo.private or (caller is not None and caller.owns(repo.key.namespace))
    )


def readable_repo(store: HubStore, key: RepoKey, caller: Principal | None) -> Repo:
    """The repo, if it exists and the caller may see it; private repos are invisible to others."""
    repo = store.get_repo(key)
    if not visible(repo, caller):
        raise RepoNotFoundError(f"Repository {key.id} not found", repo_id=key.id)
    return repo


def writable_repo(store: HubStore, key: RepoKey, caller: Principal | None) -> Repo:
    """The repo, if the caller may see it (else: not found) and write to its namespace."""
    repo = readable_repo(store, key, caller)
    check_namespace(get_writer(caller), key.namespace)
    return repo


def check_namespace(writer: Principal, namespace: str) -> None:
    if not writer.owns(namespace):
        raise Forbidden(f"{writer.user} cannot write to the namespace {namespace!r}")


def get_readable_repo(key: Key, caller: Caller, store: Store) -> Repo:
    return readable_repo(store, key, caller)


def get_writable_repo(key: Key, caller: Caller, store: Store) -> Repo:
    return writable_repo(store, key, caller)


ReadableRepo = Annotated[Repo, Depends(get_readable_repo)]
WritableRepo = Annotated[Repo, Depends(get_writable_repo)]


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def repo_url(request: Request, key: RepoKey) -> str:
    prefix = "" if key.type == "model" else f"/{key.type}s"
    return f"{base_url(request)}{prefix}/{key.id}"
