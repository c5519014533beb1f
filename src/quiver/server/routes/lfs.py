"""The legacy LFS transfer (clients with HF_HUB_DISABLE_XET=1): a batch request hands out signed
upload URLs for the objects the store lacks; the upload streams each object to its blob."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from quiver.errors import InvalidInputError
from quiver.server.deps import Store, WritableRepo, base_url
from quiver.server.errors import Forbidden, NotSupported
from quiver.server.schemas import LfsBatchBody
from quiver.store import is_sha256

router = APIRouter()
URL_LIFETIME_S = 3600


def _signature(request: Request, oid: str, size: int, expires: int) -> str:
    secret = request.app.state.lfs_secret
    return hmac.new(secret, f"{oid}:{size}:{expires}".encode(), hashlib.sha256).hexdigest()


@router.post("/{namespace}/{name}.git/info/lfs/objects/batch")
@router.post("/datasets/{namespace}/{name}.git/info/lfs/objects/batch")
def batch(request: Request, repo: WritableRepo, store: Store, body: LfsBatchBody) -> JSONResponse:
    if body.operation != "upload":
        raise NotSupported(f"the LFS {body.operation!r} operation (download through /resolve)")
    expires = int(time.time()) + URL_LIFETIME_S
    objects = []
    for item in body.objects:
        oid, size = item.oid, item.size
        if not is_sha256(oid):
            raise InvalidInputError(f"invalid LFS object id {oid!r}", hint="send its sha256")
        answer: dict[str, Any] = {"oid": oid, "size": size}
        if not store.blobs.claim(oid):  # a blob the store has is kept for the coming commit
            query = f"size={size}&expires={expires}&sig={_signature(request, oid, size, expires)}"
            href = f"{base_url(request)}/api/lfs-objects/{oid}?{query}"
            answer["authenticated"] = True
            answer["actions"] = {"upload": {"href": href, "expires_in": URL_LIFETIME_S}}
        objects.append(answer)
    return JSONResponse(
        {"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json"
    )


@router.put("/api/lfs-objects/{oid}")
async def upload(
    request: Request, store: Store, oid: str, size: int, expires: int, sig: str
) -> dict:
    """The target of a signed upload URL handed out by the batch endpoint."""
    if not (
        is_sha256(oid)
        and expires > time.time()
        and hmac.compare_digest(sig, _signature(request, oid, size, expires))
    ):
        raise Forbidden("invalid or expired LFS upload URL", hint="ask the batch endpoint again")
    with await run_in_threadpool(store.staging) as staging, staging.blobs.writer() as blob:
        async for chunk in request.stream():
            await run_in_threadpool(blob.write, chunk)
        _, stored_size = await run_in_threadpool(blob.finish, oid)
    if stored_size != size:
        raise InvalidInputError(f"LFS object {oid} has {stored_size} bytes, announced {size}")
    return {}
