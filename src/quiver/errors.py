"""The one family of errors Quiver raises.

Every error says what was wrong and what to do about it: ``QuiverError(message, hint=...)``
renders as ``"<message> (<hint>)"`` so a CLI user sees both, while callers can still catch by type
and read the fields the error is about (``repo_id``, ``revision``, ``expert``), as with
huggingface_hub's errors.
"""

from __future__ import annotations


class QuiverError(Exception):
    """Base class of every error Quiver raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        repo_id: str | None = None,
        revision: str | None = None,
        expert: str | None = None,
    ) -> None:
        self.message = message
        self.hint = hint
        self.repo_id = repo_id
        self.revision = revision
        self.expert = expert
        super().__init__(f"{message} ({hint})" if hint else message)


class InvalidInputError(QuiverError):
    """An argument that cannot be used as given: a malformed name, an unknown option, a value out
    of range."""


class NotFoundError(QuiverError):
    """A repo, revision, file, expert or library that does not exist (or is not visible to you)."""


class AlreadyExistsError(QuiverError):
    """A name that is taken: a repo, a library, an expert in a library, a tag."""


class IntegrityError(QuiverError):
    """Content that does not match its pinned hash: tampered, truncated or replaced weights."""


class InvalidAdapterError(QuiverError):
    """A folder that is not a usable LoRA expert: wrong PEFT type, pickles, missing files,
    a config that disagrees with its tensors, weights that are not finite."""


class CardError(QuiverError):
    """A model card or manifest whose YAML/JSON is malformed or misses required metadata."""


class IncompatibleExpertError(QuiverError):
    """An expert that does not fit a base model or library (architecture, shapes, rank, modules)."""


class ConnectionFailedError(QuiverError):
    """The registry endpoint could not be reached."""


class AuthenticationError(QuiverError):
    """A missing, invalid or insufficient access token."""


class ConflictError(QuiverError):
    """A write that lost a race, or would replace what it did not create."""


class RegistryError(QuiverError):
    """A registry that answered, but not as a registry should (an unexpected status, a refusal
    it gave no reason for), or a store that cannot be written (a full disk, a read-only folder)."""


class RoutingError(QuiverError):
    """A routing request that cannot be honoured (unknown strategy, expert, or bad parameters)."""


class TrainingError(QuiverError):
    """A training or library-building request that cannot run: empty or malformed data, a task
    without examples, prompts longer than the context, a bad number of clusters."""
