"""HTTP routes of the self-hosted Hub: the subset of the Hugging Face Hub API that the unmodified
``huggingface_hub`` client uses for model and dataset repos (see hub-protocol.md).

Errors go out as the Hub sends them: a status, ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
EntryNotFound) and ``X-Error-Message``, so the client raises its own typed exceptions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from quiver.registry.server.cards import card_tags, parse_front_matter
from quiver.registry.server.commits import CommitBody, ndjson_lines
from quiver.registry.server.errors import (
    AlreadyExists,
    EntryNotFound,
    Forbidden,
    HubError,
    RepoNotFound,
    Unauthorized,
    error_response,
)
from quiver.registry.server.gate import Gate
from quiver.registry.server.storage import (
    Commit,
    FileEntry,
    HubStore,
    Principal,
    Repo,
    RepoKey,
    check_path,
    check_ref_name,
    is_sha256,
)

_PLURALS = {"models": "model", "datasets": "dataset"}
_SORT_KEYS = ("createdAt", "lastModified", "downloads", "likes")
_LFS_URL_LIFETIME_S = 3600
_INVALID_TOKEN = "Invalid credentials in Authorization header"
# Routes that touch SQLite are plain functions, run in the thread pool, so a writer waiting for the
# database lock never stalls the event loop; FastAPI parses their JSON bodies beforehand.
JsonBody = Annotated[dict[str, Any], Body()]
OptionalBody = Annotated[dict[str, Any] | None, Body()]


@dataclass(frozen=True)
class HubOptions:
    """Server knobs. ``latency_ms`` delays every request (benchmarks only); files of at least
    ``lfs_threshold`` bytes are asked for through the legacy LFS transfer (clients with
    HF_HUB_DISABLE_XET=1; a client with Xet cannot upload them), smaller ones inline."""

    latency_ms: float = 0.0
    max_body_bytes: int = 1 << 30
    page_size: int = 100
    lfs_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise HubError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.max_body_bytes <= 0 or self.page_size <= 0:
            raise HubError("max_body_bytes and page_size must be positive")
        if self.lfs_threshold is not None and self.lfs_threshold <= 0:
            raise HubError(f"lfs_threshold must be positive, got {self.lfs_threshold}")


def create_app(store: HubStore, options: HubOptions | None = None) -> FastAPI:  # noqa: C901
    """The ASGI app serving ``store``."""
    options = options or HubOptions()
    app = FastAPI(title="Quiver Hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, latency_ms=options.latency_ms, max_body_bytes=options.max_body_bytes)
    lfs_secret = secrets.token_bytes(32)

    @app.exception_handler(HubError)
    async def _on_hub_error(request: Request, error: HubError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _on_bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return error_response(HubError(f"malformed request: {problems}"))

    # -- access ------------------------------------------------------------------------------

    def principal(request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not token or scheme.lower() != "bearer":
            return None
        found = store.authenticate(token.strip())
        if found is None:
            raise Unauthorized(_INVALID_TOKEN, hint="create a token with `quiver hub token create`")
        return found

    def readable(key: RepoKey, who: Principal | None) -> Repo:
        """The repo, if it exists and ``who`` may see it; private repos are invisible to others."""
        repo = store.get_repo(key)
        if repo is None or (repo.private and not (who and who.owns(key.namespace))):
            raise RepoNotFound(f"Repository {key.id} not found")
        return repo

    def require_writer(who: Principal | None, namespace: str) -> Principal:
        if who is None:
            raise Unauthorized("You must be authenticated to write", hint="pass a write token")
        if not who.write:
            raise Forbidden("This token is read-only", hint="create one with --write")
        if not who.owns(namespace):
            raise Forbidden(f"{who.user} cannot write to the namespace {namespace!r}")
        return who

    def writable(key: RepoKey, who: Principal | None) -> tuple[Repo, Principal]:
        repo = readable(key, who)
        return repo, require_writer(who, key.namespace)

    def repo_key(kind: str, namespace: str, name: str) -> RepoKey:
        if kind not in _PLURALS:
            raise RepoNotFound(f"Unknown repo type {kind!r}")
        return RepoKey(_PLURALS[kind], namespace, name)

    def prefixed_key(request: Request, namespace: str, name: str) -> RepoKey:
        """Key of a git-side URL: ``/{ns}/{name}/...`` for models, ``/datasets/...`` otherwise."""
        kind = "datasets" if request.url.path.startswith("/datasets/") else "models"
        return repo_key(kind, namespace, name)

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def repo_url(request: Request, key: RepoKey) -> str:
        prefix = "" if key.type == "model" else f"/{key.type}s"
        return f"{base_url(request)}{prefix}/{key.id}"

    # -- account and repos ---------------------------------------------------------------------

    @app.get("/api/whoami-v2")
    def whoami(request: Request) -> dict[str, Any]:
        who = principal(request)
        if who is None:
            raise Unauthorized("whoami needs a token", hint="pass a token")
        role = "write" if who.write else "read"
        return {
            "type": "user",
            "name": who.user,
            "fullname": who.user,
            "avatarUrl": "",
            "orgs": [{"type": "org", "name": org, "fullname": org} for org in who.orgs],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": "quiver", "role": role},
            },
        }

    @app.post("/api/validate-yaml")
    def validate_yaml(body: JsonBody) -> JSONResponse:
        try:
            parse_front_matter(str(body.get("content", "")))
        except Exception as error:  # any YAML error is the user's, reported back as the Hub does
            return JSONResponse({"errors": [{"message": str(error)}], "warnings": []}, 400)
        return JSONResponse({"errors": [], "warnings": []})

    def body_key(body: dict[str, Any], who: Principal | None) -> tuple[RepoKey, Principal]:
        """The repo a create/delete body names (``organization`` defaults to the caller)."""
        if who is None:
            raise Unauthorized("You must be authenticated to create or delete repos")
        namespace = body.get("organization") or who.user
        return RepoKey(body.get("type") or "model", namespace, body.get("name") or ""), who

    @app.post("/api/repos/create")
    def create_repo(request: Request, body: JsonBody) -> JSONResponse:
        key, who = body_key(body, principal(request))
        require_writer(who, key.namespace)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        url = repo_url(request, key)
        try:
            store.create_repo(key, private=private, author=who.user)
        except AlreadyExists as error:
            # exist_ok=True in the client relies on the url of the existing repo in the 409 answer.
            return JSONResponse(
                {"error": str(error), "url": url}, 409, {"X-Error-Message": str(error)}
            )
        return JSONResponse({"url": url, "name": key.id, "id": key.id})

    @app.delete("/api/repos/delete")
    def delete_repo(request: Request, body: JsonBody) -> dict[str, Any]:
        key, who = body_key(body, principal(request))
        writable(key, who)
        store.delete_repo(key)
        return {}

    @app.put("/api/{kind}/{namespace}/{name}/settings")
    def update_settings(
        request: Request, kind: str, namespace: str, name: str, body: JsonBody
    ) -> dict:
        key = repo_key(kind, namespace, name)
        writable(key, principal(request))
        private = body.get("private")
        if body.get("visibility") is not None:
            private = body["visibility"] == "private"
        if private is not None:
            store.set_private(key, bool(private))
        return {}

    # -- reading -------------------------------------------------------------------------------

    @app.get("/api/{kind}")
    def list_repos(request: Request, kind: str) -> JSONResponse:
        if kind not in _PLURALS:
            raise HubError(f"Unknown listing {kind!r}")
        query = request.query_params
        who = principal(request)
        search = (query.get("search") or "").lower()
        wanted = set(query.getlist("filter"))
        if query.get("pipeline_tag"):
            wanted.add(query["pipeline_tag"])
        full = query.get("full") in ("1", "true", "True")
        expand = query.getlist("expand") or query.getlist("expand[]")
        items = []
        for repo, head in store.list_repos(_PLURALS[kind]):
            if repo.private and not (who and who.owns(repo.key.namespace)):
                continue
            if query.get("author") and repo.key.namespace != query["author"]:
                continue
            if search not in repo.key.id.lower() or not wanted <= set(card_tags(head.card)):
                continue
            with_card = full or query.get("cardData") in ("1", "true", "True")
            item = _repo_info(
                store, repo, head, card=with_card or bool(expand), files=full or bool(expand)
            )
            items.append(item)
        sort = query.get("sort")
        if sort in _SORT_KEYS:
            # Newest (or most) first, as on the Hub; the 2.x client sends no direction.
            items.sort(key=lambda item: item[sort], reverse=query.get("direction") != "1")
        if expand:
            items = [{k: v for k, v in i.items() if k in {"id", "_id", *expand}} for i in items]
        limit = _int_query(request, "limit", options.page_size)
        return _paginate(request, items, page_size=min(limit, options.page_size))

    @app.get("/api/{kind}/{namespace}/{name}")
    def repo_info(request: Request, kind: str, namespace: str, name: str) -> dict:
        return repo_info_at(request, kind, namespace, name, "main")

    @app.get("/api/{kind}/{namespace}/{name}/revision/{revision}")
    def repo_info_at(request: Request, kind: str, namespace: str, name: str, revision: str) -> dict:
        repo = readable(repo_key(kind, namespace, name), principal(request))
        return _repo_info(store, repo, store.commit_info(repo, store.resolve(repo, revision)))

    @app.get("/api/{kind}/{namespace}/{name}/tree/{revision}")
    @app.get("/api/{kind}/{namespace}/{name}/tree/{revision}/{path:path}")
    def tree(
        request: Request, kind: str, namespace: str, name: str, revision: str, path: str = ""
    ) -> JSONResponse:
        repo = readable(repo_key(kind, namespace, name), principal(request))
        files = store.files(repo, store.resolve(repo, revision))
        prefix = check_path(path.rstrip("/")) if path else ""
        recursive = request.query_params.get("recursive") in ("1", "true", "True")
        entries = _tree_entries(files, prefix, recursive=recursive)
        return _paginate(request, entries, page_size=options.page_size)

    @app.post("/api/{kind}/{namespace}/{name}/paths-info/{revision}")
    async def paths_info(
        request: Request, kind: str, namespace: str, name: str, revision: str
    ) -> list[dict[str, Any]]:
        repo = readable(repo_key(kind, namespace, name), principal(request))
        form = await request.form()
        files = store.files(repo, store.resolve(repo, revision))
        out = []
        for path in dict.fromkeys(str(p).rstrip("/") for p in form.getlist("paths")):
            check_path(path)
            if path in files:
                out.append(_tree_file(files[path]))
            elif below := [e for p, e in files.items() if p.startswith(path + "/")]:
                out.append(_tree_folder(path, below))
        return out

    @app.get("/api/{kind}/{namespace}/{name}/refs")
    def refs(request: Request, kind: str, namespace: str, name: str) -> dict[str, Any]:
        repo = readable(repo_key(kind, namespace, name), principal(request))
        found = store.refs(repo)

        def listing(kind: str, prefix: str) -> list[dict[str, str]]:
            return [
                {"name": ref, "ref": f"{prefix}{ref}", "targetCommit": target}
                for ref, target in found[kind].items()
            ]

        return {
            "branches": listing("branch", "refs/heads/"),
            "converts": [],
            "tags": listing("tag", "refs/tags/"),
            "pullRequests": [],
        }

    @app.get("/api/{kind}/{namespace}/{name}/commits/{revision}")
    def commits(
        request: Request, kind: str, namespace: str, name: str, revision: str
    ) -> JSONResponse:
        repo = readable(repo_key(kind, namespace, name), principal(request))
        items = [
            {
                "id": commit.sha,
                "title": commit.title,
                "message": commit.message,
                "date": commit.date,
                "authors": [{"user": commit.author}],
            }
            for commit in store.history(repo, store.resolve(repo, revision))
        ]
        return _paginate(request, items, page_size=options.page_size)

    @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    @app.api_route(
        "/datasets/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"]
    )
    def resolve(request: Request, namespace: str, name: str, revision: str, path: str):
        repo = readable(prefixed_key(request, namespace, name), principal(request))
        sha = store.resolve(repo, revision)
        entry = store.file(repo, sha, check_path(path))
        if entry is None:
            missing = EntryNotFound(f"{path} does not exist at {revision}")
            return error_response(missing, headers={"X-Repo-Commit": sha})
        return FileResponse(
            store.blobs.path(entry.sha256),
            media_type="application/octet-stream",
            headers={
                "ETag": f'"{entry.etag}"',
                "X-Repo-Commit": sha,
                "Content-Disposition": f'inline; filename="{PurePosixPath(path).name}"',
            },
        )

    # -- writing -------------------------------------------------------------------------------

    @app.post("/api/{kind}/{namespace}/{name}/preupload/{revision}")
    def preupload(
        request: Request, kind: str, namespace: str, name: str, revision: str, body: JsonBody
    ) -> dict[str, Any]:
        repo, _ = writable(repo_key(kind, namespace, name), principal(request))
        sha = store.resolve(repo, revision)
        existing = store.files(repo, sha)
        answers = []
        for item in body.get("files", []):
            path = check_path(item["path"])
            lfs = options.lfs_threshold is not None and item.get("size", 0) >= options.lfs_threshold
            remote = existing.get(path)
            oid = None
            if remote is not None:
                oid = remote.sha256 if lfs else (None if remote.lfs else remote.oid)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return {"files": answers, "commitOid": sha}

    @app.post("/api/{kind}/{namespace}/{name}/commit/{revision}")
    async def commit(
        request: Request, kind: str, namespace: str, name: str, revision: str
    ) -> dict[str, Any]:
        key = repo_key(kind, namespace, name)
        repo, who = writable(key, principal(request))
        if request.query_params.get("create_pr") in ("1", "true", "True"):
            raise HubError("pull requests are not supported", hint="commit to a branch instead")
        check_ref_name(revision)
        body = CommitBody()
        async for line in ndjson_lines(request.stream()):
            await run_in_threadpool(body.take, store, line)
        sha = await run_in_threadpool(body.commit, store, repo, revision, who.user)
        return {
            "commitUrl": f"{repo_url(request, key)}/commit/{sha}",
            "commitOid": sha,
            "success": True,
            "pullRequestUrl": None,
        }

    @app.post("/api/{kind}/{namespace}/{name}/branch/{branch}")
    def create_branch(
        request: Request,
        kind: str,
        namespace: str,
        name: str,
        branch: str,
        body: OptionalBody = None,
    ) -> dict:
        repo, _ = writable(repo_key(kind, namespace, name), principal(request))
        body = body or {}
        store.create_ref(repo, "branch", branch, body.get("startingPoint") or "main")
        return {}

    @app.delete("/api/{kind}/{namespace}/{name}/branch/{branch}")
    def delete_branch(request: Request, kind: str, namespace: str, name: str, branch: str) -> dict:
        repo, _ = writable(repo_key(kind, namespace, name), principal(request))
        store.delete_ref(repo, "branch", branch)
        return {}

    @app.post("/api/{kind}/{namespace}/{name}/tag/{revision}")
    def create_tag(
        request: Request, kind: str, namespace: str, name: str, revision: str, body: JsonBody
    ) -> dict:
        repo, _ = writable(repo_key(kind, namespace, name), principal(request))
        store.create_ref(repo, "tag", str(body.get("tag", "")), revision)
        return {}

    @app.delete("/api/{kind}/{namespace}/{name}/tag/{tag}")
    def delete_tag(request: Request, kind: str, namespace: str, name: str, tag: str) -> dict:
        repo, _ = writable(repo_key(kind, namespace, name), principal(request))
        store.delete_ref(repo, "tag", tag)
        return {}

    # -- legacy LFS transfer (clients with HF_HUB_DISABLE_XET=1) ---------------------------------

    def lfs_signature(oid: str, size: int, expires: int) -> str:
        return hmac.new(lfs_secret, f"{oid}:{size}:{expires}".encode(), hashlib.sha256).hexdigest()

    @app.post("/{namespace}/{name}.git/info/lfs/objects/batch")
    @app.post("/datasets/{namespace}/{name}.git/info/lfs/objects/batch")
    def lfs_batch(request: Request, namespace: str, name: str, body: JsonBody) -> JSONResponse:
        writable(prefixed_key(request, namespace, name), principal(request))
        if body.get("operation") != "upload":
            raise HubError("only the upload operation is served", hint="download through /resolve")
        expires = int(time.time()) + _LFS_URL_LIFETIME_S
        objects = []
        for item in body.get("objects", []):
            oid, size = str(item.get("oid", "")), int(item.get("size", -1))
            if not is_sha256(oid) or size < 0:
                raise HubError(f"invalid LFS object {oid!r} of size {size}")
            answer: dict[str, Any] = {"oid": oid, "size": size}
            if not store.blobs.has(oid):
                query = f"size={size}&expires={expires}&sig={lfs_signature(oid, size, expires)}"
                href = f"{base_url(request)}/api/lfs-objects/{oid}?{query}"
                answer["authenticated"] = True
                answer["actions"] = {"upload": {"href": href, "expires_in": _LFS_URL_LIFETIME_S}}
            objects.append(answer)
        return JSONResponse(
            {"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json"
        )

    @app.put("/api/lfs-objects/{oid}")
    async def lfs_upload(request: Request, oid: str, size: int, expires: int, sig: str) -> dict:
        """The target of a signed upload URL handed out by the batch endpoint."""
        if not (
            is_sha256(oid)
            and expires > time.time()
            and hmac.compare_digest(sig, lfs_signature(oid, size, expires))
        ):
            raise Forbidden(
                "invalid or expired LFS upload URL", hint="ask the batch endpoint again"
            )
        with store.blobs.writer() as blob:
            async for chunk in request.stream():
                await run_in_threadpool(blob.write, chunk)
            _, stored_size = await run_in_threadpool(blob.finish, oid)
        if stored_size != size:
            raise HubError(f"LFS object {oid} has {stored_size} bytes, announced {size}")
        return {}

    return app


def _repo_info(
    store: HubStore, repo: Repo, commit: Commit, *, card: bool = True, files: bool = True
) -> dict[str, Any]:
    """A repo at one commit, as ``model_info``/``list_models`` return it."""
    data = commit.card or {}
    out: dict[str, Any] = {
        "_id": f"{repo.rowid:024x}",
        "id": repo.key.id,
        "author": repo.key.namespace,
        "sha": commit.sha,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": card_tags(commit.card),
        "library_name": data.get("library_name"),
        "pipeline_tag": data.get("pipeline_tag"),
    }
    if repo.key.type == "model":
        out["modelId"] = repo.key.id
    if card:
        out["cardData"] = commit.card
    if files:
        out["siblings"] = [_sibling(entry) for entry in store.files(repo, commit.sha).values()]
    return out


def _paginate(request: Request, items: list, *, page_size: int) -> JSONResponse:
    """One page of ``items`` and, if more remain, a ``Link: <...>; rel="next"`` header."""
    start = _int_query(request, "cursor", 0)
    end = start + page_size
    headers = {}
    if end < len(items):
        headers["Link"] = f'<{request.url.include_query_params(cursor=end)}>; rel="next"'
    return JSONResponse(items[start:end], headers=headers)


def _int_query(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name) or str(default)
    if not value.isdigit():
        raise HubError(f"query parameter {name}={value!r} is not a non-negative integer")
    return int(value)


def _sibling(entry: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"rfilename": entry.path, "size": entry.size, "blobId": entry.oid}
    if entry.lfs:
        out["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
    return out


def _tree_entries(
    files: dict[str, FileEntry], prefix: str, *, recursive: bool
) -> list[dict[str, Any]]:
    """Files and folders under ``prefix`` (only its direct children unless ``recursive``)."""
    base = f"{prefix}/" if prefix else ""
    below = {path: entry for path, entry in files.items() if path.startswith(base)}
    if prefix and not below:
        raise EntryNotFound(f"{prefix} does not exist in this revision")
    folders: dict[str, list[FileEntry]] = {}
    out_files = []
    for path, entry in below.items():
        rest = PurePosixPath(path[len(base) :])
        parents = [str(p) for p in reversed(rest.parents) if str(p) != "."]
        for parent in parents if recursive else parents[:1]:
            folders.setdefault(base + parent, []).append(entry)
        if recursive or not parents:
            out_files.append(_tree_file(entry))
    out_folders = [_tree_folder(path, entries) for path, entries in sorted(folders.items())]
    return out_folders + out_files


def _tree_file(entry: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.oid}
    if entry.lfs:
        out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return out


def _tree_folder(path: str, entries: list[FileEntry]) -> dict[str, Any]:
    listing = "".join(f"{e.path}\0{e.oid}\n" for e in sorted(entries, key=lambda e: e.path))
    return {"type": "directory", "path": path, "oid": hashlib.sha1(listing.encode()).hexdigest()}
