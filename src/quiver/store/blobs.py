"""Content-addressed blobs: ``blobs/ab/<sha256>``, read-only, each written whole and durably.

A blob is streamed to ``tmp/``, hashed on the way, fsynced and renamed to its address (then its
folder fsynced), so a blob that has an address is complete. Writers in flight hold a shared lease
on ``store.lock``; the garbage collector deletes only while it holds that lock exclusively, and
temporary files are swept only then (at start, when no write is in flight anywhere).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from quiver.errors import InvalidInputError
from quiver.fs import fsync_dir, publish
from quiver.store.errors import typed_disk_errors

READ_ONLY = 0o444


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``blobId``/``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


class Lease:
    """A lock on ``store.lock``: shared by writes in flight, exclusive for the garbage collector.
    Released on ``release()``, at the end of a ``with`` block, or when the process dies."""

    def __init__(self, path: Path, *, exclusive: bool, blocking: bool = True) -> None:
        self._handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._handle, operation | (0 if blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(self._handle)
            raise

    def release(self) -> None:
        if self._handle >= 0:
            os.close(self._handle)  # closing drops the lock
            self._handle = -1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class BlobWriter:
    """One blob being written to a temp file; ``finish`` moves it to its content address."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        fd, self._tmp_name = tempfile.mkstemp(dir=blobs.tmp)
        self._file = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self.size += len(chunk)
        with self._naming_the_file():
            self._file.write(chunk)

    def finish(self, expected_sha256: str | None = None) -> tuple[str, int]:
        """Store the blob, return (sha256, size); a wrong ``expected_sha256`` stores nothing."""
        with self._naming_the_file():
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        sha256 = self._digest.hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise InvalidInputError(
                f"content hashes to {sha256}, not {expected_sha256}",
                hint="re-send the file; it was corrupted on the way",
            )
        if not self._blobs.claim(sha256):
            target = self._blobs.path(sha256)
            if not target.parent.is_dir():
                target.parent.mkdir(exist_ok=True)
                fsync_dir(self._blobs.root)
            publish(self._tmp_name, target, mode=READ_ONLY)
        return sha256, self.size

    @contextmanager
    def _naming_the_file(self) -> Iterator[None]:
        """A write error says which file it was about (a file object's errors do not)."""
        try:
            yield
        except OSError as error:
            if error.filename is not None:
                raise
            raise OSError(error.errno, error.strerror, self._tmp_name) from error

    def discard(self) -> None:
        """Forget whatever was not stored (the temp file of a finished blob included)."""
        with suppress(OSError):  # closing flushes what a failed write left in the buffer
            self._file.close()
        if os.path.exists(self._tmp_name):
            os.unlink(self._tmp_name)


class BlobStore:
    """Files addressed by sha256 under ``blobs/ab/<sha256>``."""

    def __init__(self, root: Path) -> None:
        self.store_root = root
        self.root = root / "blobs"
        self.tmp = root / "tmp"
        self.lock_path = root / "store.lock"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.sweep_tmp()

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def claim(self, sha256: str) -> bool:
        """Mark an existing blob as wanted now (its mtime), so that a garbage collection running
        meanwhile keeps it; False if there is no such blob."""
        try:
            os.utime(self.path(sha256))
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's blob: it exists, its age stays
            return True
        return True

    def lease(self, *, exclusive: bool = False, blocking: bool = True) -> Lease:
        """Hold the store's write lock: shared for a write in flight (from the first blob it
        stages until its commit is recorded or abandoned), exclusive for the collector."""
        return Lease(self.lock_path, exclusive=exclusive, blocking=blocking)

    def sweep_tmp(self) -> int:
        """Remove the temp files of interrupted writes, if no write is in flight anywhere (else
        leave them to a later start); return how many were removed."""
        try:
            lease = self.lease(exclusive=True, blocking=False)
        except BlockingIOError:
            return 0
        with lease:
            return self.sweep_tmp_locked()

    def sweep_tmp_locked(self) -> int:
        """Remove everything in ``tmp/``; the caller holds the exclusive lease."""
        leftovers = list(self.tmp.iterdir())
        for entry in leftovers:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return len(leftovers)

    @contextmanager
    def writer(self) -> Iterator[BlobWriter]:
        """A blob written chunk by chunk, so no request body is ever held whole in memory. A full
        disk raises ``StorageFullError`` and leaves no temp file."""
        with typed_disk_errors(self.store_root):
            blob = BlobWriter(self)
            try:
                yield blob
            finally:
                blob.discard()

    def put(self, data: bytes) -> tuple[str, int]:
        """Store ``data``, return (sha256, size)."""
        with self.writer() as blob:
            blob.write(data)
            return blob.finish()
