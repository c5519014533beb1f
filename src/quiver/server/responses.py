"""The JSON shapes the Hub answers with: repo infos, file trees, and pages of lists."""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from quiver.errors import InvalidInputError
from quiver.store import Commit, EntryNotFoundError, FileEntry, Repo, RepoStore, card_tags


def repo_info(
    store: RepoStore, repo: Repo, commit: Commit, *, card: bool = True, files: bool = True
) -> dict[str, Any]:
    """A repo at one commit, as ``model_info``/``list_models`` return it."""
    data = commit.card or {}
    out: dict[str, Any] = {
        "_id": f"{repo.rowid:024x}",
        "id": repo.key.id,
        "author": repo.key.namespace,
        "sha": commit.sha,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": card_tags(commit.card),
        "library_name": data.get("library_name"),
        "pipeline_tag": data.get("pipeline_tag"),
    }
    if repo.key.type == "model":
        out["modelId"] = repo.key.id
    if card:
        out["cardData"] = commit.card
    if files:
        out["siblings"] = [_sibling(entry) for entry in store.files(repo, commit.sha).values()]
    return out


def paginate(request: Request, items: list, *, page_size: int) -> JSONResponse:
    """One page of ``items`` and, if more remain, a ``Link: <...>; rel="next"`` header."""
    start = int_query(request, "cursor", 0)
    end = start + page_size
    headers = {}
    if end < len(items):
        headers["Link"] = f'<{request.url.include_query_params(cursor=end)}>; rel="next"'
    return JSONResponse(items[start:end], headers=headers)


def int_query(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name) or str(default)
    if not value.isdigit():
        raise InvalidInputError(f"query parameter {name}={value!r} is not a non-negative integer")
    return int(value)


def flag_query(request: Request, name: str) -> bool:
    return request.query_params.get(name) in ("1", "true", "True")


def _sibling(entry: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"rfilename": entry.path, "size": entry.size, "blobId": entry.oid}
    if entry.lfs:
        out["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
    return out


def tree_entries(
    files: dict[str, FileEntry], prefix: str, *, recursive: bool
) -> list[dict[str, Any]]:
    """Files and folders under ``prefix`` (only its direct children unless ``recursive``)."""
    base = f"{prefix}/" if prefix else ""
    below = {path: entry for path, entry in files.items() if path.startswith(base)}
    if prefix and not below:
        raise EntryNotFoundError(f"{prefix} does not exist in this revision")
    folders: dict[str, list[FileEntry]] = {}
    out_files = []
    for path, entry in below.items():
        rest = PurePosixPath(path[len(base) :])
        parents = [str(p) for p in reversed(rest.parents) if str(p) != "."]
        for parent in parents if recursive else parents[:1]:
            folders.setdefault(base + parent, []).append(entry)
        if recursive or not parents:
            out_files.append(tree_file(entry))
    out_folders = [tree_folder(path, entries) for path, entries in sorted(folders.items())]
    return out_folders + out_files


def tree_file(entry: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.oid}
    if entry.lfs:
        out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return out


def tree_folder(path: str, entries: list[FileEntry]) -> dict[str, Any]:
    listing = "".join(f"{e.path}\0{e.oid}\n" for e in sorted(entries, key=lambda e: e.path))
    return {"type": "directory", "path": path, "oid": hashlib.sha1(listing.encode()).hexdigest()}
