"""The ASGI middleware in front of every route of the self-hosted Hub."""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import unquote

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quiver.server.errors import HubError, InternalError, PayloadTooLarge, error_response

logger = logging.getLogger("quiver.server")


class _BodyTooLarge(Exception):
    pass


class Gate:
    """ASGI middleware in front of every route: injected latency, refusal of oversized bodies
    (413) and of '..' segments or encoded slashes in repo ids and revisions (400)."""

    def __init__(self, app: ASGIApp, *, latency_ms: float, max_body_bytes: int) -> None:
        self.app = app
        self.latency_s = latency_ms / 1000
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        problem = path_problem(scope.get("raw_path") or scope["path"].encode())
        if problem:
            await error_response(HubError(problem, hint="use plain names"))(scope, receive, send)
            return
        limit = self.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _too_large(scope, limit)(scope, receive, send)
            return
        received, started = 0, False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(scope, limit)(scope, receive, send)
        except Exception as error:  # a bug: answer it, rather than let the connection be reset
            if started:
                raise
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            unexpected = InternalError(f"internal error of quiver hub serve: {error!r}")
            await error_response(unexpected)(scope, receive, send)


def _too_large(scope: Scope, limit: int) -> JSONResponse:
    """413, with the way out that fits: an LFS upload is one file; a commit may be several."""
    if scope["path"].startswith("/api/lfs-objects/"):
        hint = "the file is bigger than this server accepts; ask its admin to raise it"
    else:
        hint = "commit fewer files at once, or ask the server's admin to raise it"
    refused = PayloadTooLarge(f"request body exceeds {limit} bytes (--max-body-bytes)", hint=hint)
    return error_response(refused)


def path_problem(raw_path: bytes) -> str | None:
    """Why a raw request path is refused: any '.'/'..' segment (even percent-encoded), or an
    encoded slash before the file-path part (repo ids and revisions never contain one)."""
    segments = raw_path.decode("latin-1").split("/")
    decoded = [unquote(segment) for segment in segments]
    if any(part in (".", "..") for segment in decoded for part in re.split(r"[/\\]", segment)):
        return "'.' and '..' are not allowed in repo ids, revisions or file paths"
    head = len(segments)
    for operation in ("tree", "resolve"):
        if operation in segments:
            head = min(head, segments.index(operation) + 2)
    if any("/" in segment or "\\" in segment for segment in decoded[:head]):
        return "encoded slashes are not allowed in repo ids or revisions"
    return None
