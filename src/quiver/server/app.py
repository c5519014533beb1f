"""The self-hosted Hub as an ASGI app: the subset of the Hugging Face Hub API that the unmodified
``huggingface_hub`` client uses for model and dataset repos (see hub-protocol.md), one router per
resource, with the store and the options in ``app.state``.

Errors go out as the Hub sends them: a status, ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
EntryNotFound) and ``X-Error-Message``, so the client raises its own typed exceptions.
"""

from __future__ import annotations

import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from quiver.errors import QuiverError
from quiver.server.accounts import HubStore
from quiver.server.errors import error_response, invalid_fields
from quiver.server.gate import Gate
from quiver.server.options import HubOptions
from quiver.server.routes import account, commits, files, lfs, refs, repos, unsupported


def create_app(store: HubStore, options: HubOptions | None = None) -> FastAPI:
    """The ASGI app serving ``store``."""
    options = options or HubOptions()
    app = FastAPI(title="Quiver Hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.options = options
    app.state.lfs_secret = secrets.token_bytes(32)
    app.add_middleware(Gate, latency_ms=options.latency_ms, max_body_bytes=options.max_body_bytes)
    app.add_exception_handler(QuiverError, _on_quiver_error)
    app.add_exception_handler(RequestValidationError, _on_bad_request)
    app.add_exception_handler(HTTPException, unsupported.on_http_error)
    for module in (account, repos, files, commits, refs, lfs):  # whoami before /api/{kind}
        app.include_router(module.router)
    return app


async def _on_quiver_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, QuiverError)
    return error_response(error)


async def _on_bad_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    return error_response(invalid_fields("request", list(error.errors())))
