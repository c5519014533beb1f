"""Reading the Hub's NDJSON commit body: a header line, then one line per added, LFS or deleted
file, each validated as it arrives."""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from quiver.errors import InvalidInputError
from quiver.server.errors import invalid_fields
from quiver.server.schemas import CommitHeader, CommitLine, DeletedPath, InlineFile, LfsFile
from quiver.store import Deletion, FileEntry, RepoKey, RepoStore, Staging, check_path

_VALUES: dict[str, type[BaseModel]] = {
    "header": CommitHeader,
    "file": InlineFile,
    "lfsFile": LfsFile,
    "deletedFile": DeletedPath,
    "deletedFolder": DeletedPath,
}


async def ndjson_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of a streamed body, each as soon as it is complete."""
    buffer = bytearray()
    async for chunk in chunks:
        searched = len(buffer)
        buffer.extend(chunk)
        while (newline := buffer.find(b"\n", searched)) >= 0:
            yield bytes(buffer[:newline])
            del buffer[: newline + 1]
            searched = 0
    if buffer:
        yield bytes(buffer)


@dataclass
class CommitBody:
    """An NDJSON commit read line by line: each file's blob is staged as its line arrives, so
    memory holds one file at a time; the commit itself is one transaction at the end."""

    header: CommitHeader | None = None
    additions: list[FileEntry] = field(default_factory=list)
    deletions: list[Deletion] = field(default_factory=list)
    lines_read: int = 0

    def take(self, staging: Staging, line: bytes) -> None:
        self.lines_read += 1
        if not line.strip():
            return
        where = f"line {self.lines_read} of the commit"
        try:
            item = CommitLine.model_validate_json(line)
        except ValidationError as error:
            raise invalid_fields(where, error.errors()) from None
        try:
            value = _VALUES[item.key].model_validate(item.value)
        except ValidationError as error:
            raise invalid_fields(where, error.errors(), prefix=("value",)) from None
        if isinstance(value, CommitHeader):
            self.header = value
        elif isinstance(value, InlineFile):
            try:
                content = base64.b64decode(value.content, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInputError(
                    f"{where}: the content of {value.path!r} is not base64"
                ) from None
            self.additions.append(staging.add_bytes(value.path, content))
        elif isinstance(value, LfsFile):
            self.additions.append(staging.add_lfs(value.path, value.oid, value.size))
        else:
            path = check_path(value.path.rstrip("/"))
            self.deletions.append(Deletion(path, folder=item.key == "deletedFolder"))

    def commit(self, store: RepoStore, key: RepoKey, branch: str, author: str) -> str:
        if self.header is None:
            raise InvalidInputError(
                "the commit has no header", hint="send a first line with a summary"
            )
        return store.commit(
            key,
            branch,
            additions=self.additions,
            deletions=self.deletions,
            title=self.header.summary,
            message=self.header.description or "",
            author=author,
            parent_commit=self.header.parentCommit,
        )
