"""What the store keeps: repos, commits and the files of a commit, as immutable records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from quiver.errors import InvalidInputError
from quiver.store.blobs import lfs_pointer
from quiver.store.names import check_name, check_repo_id

REPO_TYPES = ("model", "dataset")


@dataclass(frozen=True)
class RepoKey:
    """A repo's identity: type and ``namespace/name``."""

    type: str
    namespace: str
    name: str

    def __post_init__(self) -> None:
        if self.type not in REPO_TYPES:
            raise InvalidInputError(
                f"unsupported repo type {self.type!r}", hint=f"use one of {REPO_TYPES}"
            )
        check_name(self.namespace, "namespace")
        check_name(self.name, "repo name")

    @classmethod
    def parse(cls, repo_id: str, type: str = "model") -> RepoKey:
        namespace, name = check_repo_id(repo_id).split("/")
        return cls(type, namespace, name)

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Repo:
    key: RepoKey
    rowid: int
    private: bool
    created_at: str


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. ``oid`` is the git blob sha1 (of the LFS pointer for LFS files);
    ``sha256`` addresses the content in the blob store."""

    path: str
    size: int
    sha256: str
    oid: str
    lfs: bool

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: the sha256 for LFS files, the git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    author: str
    date: str  # the Hub's format: ISO 8601, milliseconds, trailing Z
    title: str
    message: str
    card: dict[str, Any] | None  # the README's YAML front matter at this commit

    @property
    def datetime(self) -> datetime:
        return datetime.fromisoformat(self.date.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Deletion:
    path: str
    folder: bool
