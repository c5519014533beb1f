"""Errors on the wire: every Quiver error becomes the HTTP status and ``X-Error-Code`` that the
``huggingface_hub`` client turns back into its own typed exceptions."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from quiver.errors import (
    AlreadyExistsError,
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    QuiverError,
)
from quiver.store import (
    EntryNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StaleParentError,
    StorageFullError,
)


class HubError(QuiverError):
    """A refusal of the server itself (the store's errors are mapped below); ``status`` says how
    it goes over the wire."""

    status = 400


class Unauthorized(HubError, AuthenticationError):
    status = 401


class Forbidden(HubError, AuthenticationError):
    status = 403


class PayloadTooLarge(HubError):
    status = 413


class InternalError(HubError):
    """A bug of the server, answered as JSON rather than with a reset connection."""

    status = 500


class NotSupported(HubError):
    """A Hub feature this server does not have: said so, rather than a bare 404."""

    status = 501

    def __init__(self, feature: str) -> None:
        super().__init__(
            f"{feature} is not supported by quiver hub serve",
            hint="quiver hub serve covers model and dataset repos: files, commits, branches, "
            "tags, search and access tokens",
        )


# Most specific first: the first class an error is an instance of gives its status and code.
_WIRE: tuple[tuple[type[QuiverError], int, str | None], ...] = (
    (RepoNotFoundError, 404, "RepoNotFound"),
    (RevisionNotFoundError, 404, "RevisionNotFound"),
    (EntryNotFoundError, 404, "EntryNotFound"),
    (NotFoundError, 404, None),
    (StaleParentError, 412, None),
    (AlreadyExistsError, 409, None),
    (ConflictError, 409, None),
    (StorageFullError, 507, None),  # not retried by the client, unlike a 500
)


def wire_status(error: QuiverError) -> tuple[int, str | None]:
    """The HTTP status and ``X-Error-Code`` of an error; 400 for any other refused input."""
    if isinstance(error, HubError):
        return error.status, None
    return next(((s, c) for kind, s, c in _WIRE if isinstance(error, kind)), (400, None))


def error_response(error: QuiverError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The Hub's error shape: status, ``X-Error-Code``, ``X-Error-Message``, ``{"error": ...}``
    (the same text in both, which the client then shows once)."""
    status, code = wire_status(error)
    message = " ".join(str(error).split())  # the message and the hint, on one line
    out = {"X-Error-Message": message.encode("ascii", "replace").decode(), **(headers or {})}
    if code:
        out["X-Error-Code"] = code
    return JSONResponse({"error": str(error)}, status_code=status, headers=out)


def invalid_fields(where: str, problems: list[dict], prefix: tuple = ()) -> InvalidInputError:
    """A pydantic/FastAPI validation failure as one line that names each field at fault."""
    fields = "; ".join(
        f"{'.'.join(str(part) for part in (*prefix, *problem['loc'])) or 'body'}: {problem['msg']}"
        for problem in problems
    )
    return InvalidInputError(f"malformed {where}: {fields}")
