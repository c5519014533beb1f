"""The versioned repo store that both the local registry (in-process) and ``quiver hub serve``
(over HTTP) use: repos, commits, branches and tags, files, card metadata, content-addressed blobs.

It knows nothing of experts or HTTP: the registry and the server are built on it.
"""

from quiver.store.blobs import BlobStore, git_blob_sha1, lfs_pointer
from quiver.store.cards import card_tags, parse_front_matter
from quiver.store.engine import RepoStore, now_iso
from quiver.store.errors import (
    EntryNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StaleParentError,
    StorageFullError,
)
from quiver.store.gc import Garbage, delete_garbage, find_garbage
from quiver.store.names import (
    check_name,
    check_path,
    check_ref_name,
    check_repo_id,
    is_sha,
    is_sha256,
)
from quiver.store.records import REPO_TYPES, Commit, Deletion, FileEntry, Repo, RepoKey
from quiver.store.staging import Staging

__all__ = [
    "REPO_TYPES",
    "BlobStore",
    "Commit",
    "Deletion",
    "EntryNotFoundError",
    "FileEntry",
    "Garbage",
    "Repo",
    "RepoKey",
    "RepoNotFoundError",
    "RepoStore",
    "RevisionNotFoundError",
    "Staging",
    "StaleParentError",
    "StorageFullError",
    "card_tags",
    "check_name",
    "check_path",
    "check_ref_name",
    "check_repo_id",
    "delete_garbage",
    "find_garbage",
    "git_blob_sha1",
    "is_sha",
    "is_sha256",
    "lfs_pointer",
    "now_iso",
    "parse_front_matter",
]
