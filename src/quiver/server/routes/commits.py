"""History and writing: the commit list, ``preupload`` (how each file will be sent), and the
NDJSON commit itself."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from quiver.server.commits import CommitBody, ndjson_lines
from quiver.server.deps import Options, ReadableRepo, Store, WritableRepo, Writer, repo_url
from quiver.server.errors import HubError
from quiver.server.responses import flag_query, paginate
from quiver.store import check_path, check_ref_name

router = APIRouter(prefix="/api/{kind}/{namespace}/{name}")


@router.get("/commits/{revision}")
def commits(
    request: Request, repo: ReadableRepo, store: Store, options: Options, revision: str
) -> JSONResponse:
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
    return paginate(request, items, page_size=options.page_size)


@router.post("/preupload/{revision}")
def preupload(
    repo: WritableRepo,
    store: Store,
    options: Options,
    revision: str,
    body: Annotated[dict[str, Any], Body()],
) -> dict[str, Any]:
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


@router.post("/commit/{revision}")
async def commit(
    request: Request, repo: WritableRepo, writer: Writer, store: Store, revision: str
) -> dict[str, Any]:
    """Each file is staged as its line arrives; the commit is recorded once the body is read."""
    if flag_query(request, "create_pr"):
        raise HubError("pull requests are not supported", hint="commit to a branch instead")
    check_ref_name(revision)
    body = CommitBody()
    with await run_in_threadpool(store.staging) as staging:
        async for line in ndjson_lines(request.stream()):
            await run_in_threadpool(body.take, staging, line)
        sha = await run_in_threadpool(body.commit, store, repo.key, revision, writer.user)
    return {
        "commitUrl": f"{repo_url(request, repo.key)}/commit/{sha}",
        "commitOid": sha,
        "success": True,
        "pullRequestUrl": None,
    }
