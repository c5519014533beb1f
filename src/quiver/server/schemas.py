"""The JSON bodies the Hub API accepts, validated before a route runs: a missing field or one of
the wrong type is a 400 that names it, never a 500."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class RepoBody(BaseModel):
    """``POST /api/repos/create`` and ``DELETE /api/repos/delete``."""

    name: str
    organization: str | None = None
    type: str | None = None
    private: bool | None = None
    visibility: Literal["public", "private", "protected"] | None = None


class SettingsBody(BaseModel):
    private: bool | None = None
    visibility: Literal["public", "private", "protected"] | None = None
    gated: Literal["auto", "manual", False] | None = None


class YamlBody(BaseModel):
    content: str = ""


class PlannedFile(BaseModel):
    path: str
    size: int = Field(default=0, ge=0)
    sample: str | None = None


class PreuploadBody(BaseModel):
    files: list[PlannedFile] = []


class BranchBody(BaseModel):
    startingPoint: str | None = None


class TagBody(BaseModel):
    tag: str
    message: str | None = None


class LfsObject(BaseModel):
    oid: str
    size: int = Field(ge=0)


class LfsBatchBody(BaseModel):
    operation: str
    objects: list[LfsObject] = []


# The lines of an NDJSON commit: {"key": ..., "value": {...}}.
class CommitLine(BaseModel):
    key: Literal["header", "file", "lfsFile", "deletedFile", "deletedFolder"]
    value: dict


class CommitHeader(BaseModel):
    summary: str = Field(min_length=1)
    description: str | None = None
    parentCommit: str | None = None


class InlineFile(BaseModel):
    path: str
    content: str
    encoding: Literal["base64"] = "base64"


class LfsFile(BaseModel):
    path: str
    oid: str
    size: int | None = Field(default=None, ge=0)
    algo: Literal["sha256"] = "sha256"


class DeletedPath(BaseModel):
    path: str
