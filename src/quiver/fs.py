"""Files that appear whole or not at all, and survive a power cut once they have appeared.

A file is written to a temporary name beside its target, flushed to disk (fsync), renamed onto the
target (atomic on POSIX), and the folder holding it is flushed too, so the rename itself is
durable. Every layer writes its files through here: the store's blobs, Arrow prototypes, kernels.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (files created, renamed or removed in it) durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def publish(temp: str | os.PathLike, target: str | os.PathLike, *, mode: int | None = None) -> None:
    """Move the finished file ``temp`` onto ``target`` durably: fsync, rename, fsync the folder."""
    handle = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
    if mode is not None:
        os.chmod(temp, mode)
    os.replace(temp, target)
    fsync_dir(Path(target).parent)


@contextmanager
def atomic_path(target: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``target`` for the caller to write (by any means: a library, a
    compiler); when the block ends without error it becomes ``target``, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        publish(temp, target, mode=mode)
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``target`` atomically and durably."""
    with atomic_path(target, mode=mode) as temp:
        temp.write_bytes(data)
    return Path(target)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
