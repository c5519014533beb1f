"""Files of a revision: trees, paths-info, and file contents (``resolve``)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, JSONResponse

from quiver.server.deps import Options, ReadableRepo, Store
from quiver.server.errors import error_response
from quiver.server.responses import flag_query, paginate, tree_entries, tree_file, tree_folder
from quiver.store import EntryNotFoundError, check_path

router = APIRouter()


@router.get("/api/{kind}/{namespace}/{name}/tree/{revision}")
@router.get("/api/{kind}/{namespace}/{name}/tree/{revision}/{path:path}")
def tree(
    request: Request,
    repo: ReadableRepo,
    store: Store,
    options: Options,
    revision: str,
    path: str = "",
) -> JSONResponse:
    files = store.files(repo, store.resolve(repo, revision))
    prefix = check_path(path.rstrip("/")) if path else ""
    entries = tree_entries(files, prefix, recursive=flag_query(request, "recursive"))
    return paginate(request, entries, page_size=options.page_size)


@router.post("/api/{kind}/{namespace}/{name}/paths-info/{revision}")
def paths_info(
    repo: ReadableRepo,
    store: Store,
    revision: str,
    paths: Annotated[list[str] | None, Form()] = None,
) -> list[dict[str, Any]]:
    files = store.files(repo, store.resolve(repo, revision))
    out = []
    for path in dict.fromkeys(p.rstrip("/") for p in paths or ()):
        check_path(path)
        if path in files:
            out.append(tree_file(files[path]))
        elif below := [e for p, e in files.items() if p.startswith(path + "/")]:
            out.append(tree_folder(path, below))
    return out


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
@router.api_route(
    "/datasets/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"]
)
def resolve(repo: ReadableRepo, store: Store, revision: str, path: str):
    sha = store.resolve(repo, revision)
    entry = store.file(repo, sha, check_path(path))
    if entry is None:
        missing = EntryNotFoundError(f"{path} does not exist at {revision}")
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
