"""The store's own refusals, each a kind of Quiver error that callers (the local registry, the Hub
server) can tell apart: the server maps them to the Hub's statuses and ``X-Error-Code``."""

from __future__ import annotations

from quiver.errors import ConflictError, NotFoundError


class RepoNotFoundError(NotFoundError):
    """No repo of that type and id in the store."""


class RevisionNotFoundError(NotFoundError):
    """No branch, tag or commit of that name in the repo."""


class EntryNotFoundError(NotFoundError):
    """No file or folder of that path at the revision."""


class StaleParentError(ConflictError):
    """The branch moved since the writer read it (its parent commit is no longer the head)."""
