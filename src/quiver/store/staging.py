"""The files one write stages, blob by blob, before its commit records them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from quiver.errors import InvalidInputError
from quiver.store.blobs import BlobStore, git_blob_sha1, lfs_pointer
from quiver.store.names import check_path, is_sha256
from quiver.store.records import FileEntry


class Staging:
    """The files one write stages before its commit, under the store's shared lease (so that a
    garbage collection cannot take their blobs away before the commit records them). Use it as a
    context manager around the staging and the commit."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self._lease = blobs.lease()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lease.release()

    def add_bytes(self, path: str, data: bytes) -> FileEntry:
        """A regular (inline) file's content, stored and described."""
        check_path(path)
        sha256, size = self.blobs.put(data)
        return FileEntry(path, size, sha256, git_blob_sha1(data), lfs=False)

    def add_file(self, path: str, source: Path) -> FileEntry:
        """A local file as a regular file; its content is copied only if the store lacks it."""
        check_path(path)
        size = source.stat().st_size
        git, sha256, read = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256(), 0
        with open(source, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                git.update(chunk)
                sha256.update(chunk)
                read += len(chunk)
        digest = sha256.hexdigest()
        if read != size:
            raise InvalidInputError(f"{source} changed while it was read", hint="push it again")
        if not self.blobs.claim(digest):
            with self.blobs.writer() as blob, open(source, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    blob.write(chunk)
                blob.finish(digest)
        return FileEntry(path, size, digest, git.hexdigest(), lfs=False)

    def add_lfs(self, path: str, sha256: str, size: int | None) -> FileEntry:
        """An LFS file whose content was uploaded before the commit."""
        check_path(path)
        sha256 = sha256.lower()
        if not is_sha256(sha256):
            raise InvalidInputError(
                f"invalid LFS oid {sha256!r} for {path!r}", hint="send the file's sha256"
            )
        if not self.blobs.claim(sha256):
            raise InvalidInputError(
                f"LFS object {sha256} of {path!r} was never uploaded",
                hint="upload it through the LFS batch endpoint before committing",
            )
        actual = self.blobs.path(sha256).stat().st_size
        if size is not None and size != actual:
            raise InvalidInputError(f"LFS object {sha256} has {actual} bytes, not {size}")
        pointer = lfs_pointer(sha256, actual)
        return FileEntry(path, actual, sha256, git_blob_sha1(pointer), lfs=True)
