"""Reading the Hub's NDJSON commit body: a header line, then one line per added, LFS or deleted
file."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from quiver.errors import InvalidInputError
from quiver.store import Deletion, FileEntry, RepoKey, RepoStore, Staging, check_path


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

    header: dict[str, Any] = field(default_factory=dict)
    additions: list[FileEntry] = field(default_factory=list)
    deletions: list[Deletion] = field(default_factory=list)
    lines_read: int = 0

    def take(self, staging: Staging, line: bytes) -> None:
        self.lines_read += 1
        if not line.strip():
            return
        try:
            item = json.loads(line)
            key, value = str(item["key"]), dict(item["value"])
        except (ValueError, KeyError, TypeError):
            raise InvalidInputError(
                f"line {self.lines_read} of the commit is not a {{key, value}} object"
            ) from None
        if key == "header":
            self.header = value
        elif key == "file":
            if value.get("encoding", "base64") != "base64":
                raise InvalidInputError(f"unsupported encoding {value.get('encoding')!r}")
            try:
                content = base64.b64decode(value["content"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInputError(f"content of {value.get('path')!r} is not base64") from None
            self.additions.append(staging.add_bytes(value["path"], content))
        elif key == "lfsFile":
            entry = staging.add_lfs(value["path"], str(value["oid"]), value.get("size"))
            self.additions.append(entry)
        elif key in ("deletedFile", "deletedFolder"):
            path = check_path(str(value["path"]).rstrip("/"))
            self.deletions.append(Deletion(path, folder=key == "deletedFolder"))
        else:
            raise InvalidInputError(f"unknown commit operation {key!r}")

    def commit(self, store: RepoStore, key: RepoKey, branch: str, author: str) -> str:
        if not self.header.get("summary"):
            raise InvalidInputError(
                "the commit has no summary", hint="send a header line with a summary"
            )
        return store.commit(
            key,
            branch,
            additions=self.additions,
            deletions=self.deletions,
            title=self.header["summary"],
            message=self.header.get("description") or "",
            author=author,
            parent_commit=self.header.get("parentCommit"),
        )
