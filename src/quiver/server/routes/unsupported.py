"""Requests for what this server does not serve (a Hub feature it lacks, a repo type, a route that
does not exist): a 501 whose message, which the client shows, says so, never a bare 404."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from quiver.server.errors import HubError, InternalError, NotSupported, error_response

# The client methods behind routes this server has not: named in the answer.
_FEATURES = (
    (re.compile(r"^/api/repos/move$"), "move_repo"),
    (re.compile(r"/super-squash/"), "super_squash_history"),
    (re.compile(r"/duplicate$"), "duplicate_repo"),
    (re.compile(r"/discussions(/|$)"), "discussions and pull requests"),
    (re.compile(r"/xet-(read|write)-token/"), "Xet transfers (set HF_HUB_DISABLE_XET=1)"),
)


async def on_http_error(request: Request, error: Exception) -> JSONResponse:
    """No route for the path (404) or the method (405): not supported, said in JSON. Other
    refusals of the framework (a body it cannot parse: 400) keep their status."""
    assert isinstance(error, HTTPException)
    if error.status_code not in (404, 405):
        refused = (HubError if error.status_code < 500 else InternalError)(
            f"{request.method} {request.url.path}: {error.detail}"
        )
        refused.status = error.status_code
        return error_response(refused)
    path = request.url.path
    feature = next((name for pattern, name in _FEATURES if pattern.search(path)), None)
    what = f"{request.method} {path}" + (f" ({feature})" if feature else "")
    return error_response(NotSupported(what))
