"""History and writing: the commit list, ``preupload`` (how each file will be sent), and the
NDJSON commit itself."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from quiver.server.commits import CommitBody, ndjson_lines
from quiver.server.deps import Options, ReadableRepo, Store, WritableRepo, Writer, repo_url
from quiver.server.errors import NotSupported, PayloadTooLarge
from quiver.server.responses import flag_query, paginate
from quiver.server.schemas import PreuploadBody
from quiver.store import check_path, check_ref_name

router = APIRouter(prefix="/api/{kind}/{namespace}/{name}")
_LINE_OVERHEAD = 256  # the JSON around one inline file of the commit body, generously


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
    repo: WritableRepo, store: Store, options: Options, revision: str, body: PreuploadBody
) -> dict[str, Any]:
    """How each planned file is to be sent: inline in the commit, or (from ``lfs_threshold`` on)
    through LFS; a file that cannot fit in one request body is refused here, by name."""
    sha = store.resolve(repo, revision)
    existing = store.files(repo, sha)
    answers = []
    for planned in body.files:
        path = check_path(planned.path)
        lfs = options.lfs_threshold is not None and planned.size >= options.lfs_threshold
        _check_fits(path, planned.size, lfs=lfs, limit=options.max_body_bytes)
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


def _check_fits(path: str, size: int, *, lfs: bool, limit: int) -> None:
    """Refuse a file bigger than one request body may be (inline files go base64-encoded)."""
    sent = size if lfs else 4 * -(-size // 3) + len(path) + _LINE_OVERHEAD
    if sent <= limit:
        return
    encoded = "" if lfs else f", {sent} bytes once base64-encoded in the commit"
    raise PayloadTooLarge(
        f"{path} is {size} bytes{encoded}; this server accepts request bodies of at most "
        f"{limit} bytes",
        hint="ask its admin to raise --max-body-bytes, or to set --lfs-threshold for clients "
        "with HF_HUB_DISABLE_XET=1"
        if not lfs
        else "ask its admin to raise --max-body-bytes",
    )


@router.post("/commit/{revision}")
async def commit(
    request: Request, repo: WritableRepo, writer: Writer, store: Store, revision: str
) -> dict[str, Any]:
    """Each file is staged as its line arrives; the commit is recorded once the body is read."""
    if flag_query(request, "create_pr"):
        raise NotSupported("committing as a pull request (create_pr)")
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
