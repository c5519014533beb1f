"""Typed errors of the self-hosted Hub, each mapped to the HTTP status and ``X-Error-Code`` that the
``huggingface_hub`` client turns back into its own typed exceptions."""

from __future__ import annotations

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
