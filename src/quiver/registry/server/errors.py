"""Typed errors of the self-hosted Hub, each mapped to the HTTP status and ``X-Error-Code`` that the
``huggingface_hub`` client turns back into its own typed exceptions."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from quiver.errors import AuthenticationError, ConflictError, NotFoundError, QuiverError


class HubError(QuiverError):
    """A request the Hub refuses; ``status`` and ``code`` say how it goes over the wire."""

    status = 400
    code: str | None = None


class RepoNotFound(HubError, NotFoundError):
    status, code = 404, "RepoNotFound"


class RevisionNotFound(HubError, NotFoundError):
    status, code = 404, "RevisionNotFound"


class EntryNotFound(HubError, NotFoundError):
    status, code = 404, "EntryNotFound"


class Unauthorized(HubError, AuthenticationError):
    status = 401


class Forbidden(HubError, AuthenticationError):
    status = 403


class AlreadyExists(HubError, ConflictError):
    status = 409


class StaleParent(HubError, ConflictError):
    """The branch moved since the client read it (``parentCommit`` no longer matches)."""

    status = 412


class PayloadTooLarge(HubError):
    status = 413


def error_response(error: HubError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The Hub's error shape: status, ``X-Error-Code``, ``X-Error-Message``, ``{"error": ...}``."""
    out = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **(headers or {})}
    if error.code:
        out["X-Error-Code"] = error.code
    return JSONResponse({"error": str(error)}, status_code=error.status, headers=out)
