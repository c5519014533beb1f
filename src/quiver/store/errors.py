"""The store's own refusals, each a kind of Quiver error that callers (the local registry, the Hub
server) can tell apart: the server maps them to the Hub's statuses and ``X-Error-Code``."""

from __future__ import annotations

import errno
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quiver.errors import ConflictError, NotFoundError, RegistryError

_NEARLY_FULL = 1 << 20  # bytes


class RepoNotFoundError(NotFoundError):
    """No repo of that type and id in the store."""


class RevisionNotFoundError(NotFoundError):
    """No branch, tag or commit of that name in the repo."""


class EntryNotFoundError(NotFoundError):
    """No file or folder of that path at the revision."""


class StaleParentError(ConflictError):
    """The branch moved since the writer read it (its parent commit is no longer the head)."""


class StorageFullError(RegistryError):
    """The disk (or quota) of the store is full: nothing of the write that hit it was kept."""


@contextmanager
def typed_disk_errors(root: Path) -> Iterator[None]:
    """Turn a full disk, whether the OS or SQLite reports it, into ``StorageFullError``."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _full(root) from error
    except sqlite3.OperationalError as error:
        # SQLite says "database or disk is full", or, when the WAL index cannot grow, only
        # "disk I/O error": on a disk with next to no space left, that is the same thing.
        if "full" not in str(error) and not ("I/O" in str(error) and _nearly_full(root)):
            raise
        raise _full(root) from error


def _nearly_full(root: Path) -> bool:
    existing = next(p for p in (root, *root.parents) if p.exists())
    return shutil.disk_usage(existing).free < _NEARLY_FULL


def _full(root: Path) -> StorageFullError:
    return StorageFullError(
        f"no space left on the disk of the store at {root}; nothing of this write was kept",
        hint=f"free some space (`quiver hub gc --root {root} --delete` removes unused blobs) "
        "and retry",
    )
