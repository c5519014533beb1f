"""The one family of errors Quiver raises.

Every error says what was wrong and what to do about it: ``QuiverError(message, hint=...)``
renders as ``"<message> (<hint>)"`` so a CLI user sees both, while callers can still catch by type.
"""

from __future__ import annotations


class QuiverError(Exception):
    """Base class of every error Quiver raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class NotFoundError(QuiverError):
    """A repo, revision, file, expert or library that does not exist (or is not visible to you)."""


class IntegrityError(QuiverError):
    """Content that does not match its pinned hash: tampered, truncated or replaced weights."""


class InvalidAdapterError(QuiverError):
    """A folder that is not a usable LoRA expert: wrong PEFT type, pickles, missing files."""


class CardError(QuiverError):
    """A model card or manifest whose YAML/JSON is malformed or misses required metadata."""


class IncompatibleExpertError(QuiverError):
    """An expert that does not fit a base model or library (architecture, shapes, rank, modules)."""


class ConnectionFailedError(QuiverError):
    """The registry endpoint could not be reached."""


class AuthenticationError(QuiverError):
    """A missing, invalid or insufficient access token."""


class ConflictError(QuiverError):
    """A write that lost a race: the target changed since it was read."""


class RoutingError(QuiverError):
    """A routing request that cannot be honoured (unknown strategy, expert, or bad parameters)."""
