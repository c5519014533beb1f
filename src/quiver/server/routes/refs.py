"""Branches and tags: list, create, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from quiver.server.deps import ReadableRepo, Store, WritableRepo
from quiver.server.schemas import BranchBody, TagBody

router = APIRouter(prefix="/api/{kind}/{namespace}/{name}")


@router.get("/refs")
def refs(repo: ReadableRepo, store: Store) -> dict[str, Any]:
    found = store.refs(repo)

    def listing(kind: str, prefix: str) -> list[dict[str, str]]:
        return [
            {"name": ref, "ref": f"{prefix}{ref}", "targetCommit": target}
            for ref, target in found[kind].items()
        ]

    return {
        "branches": listing("branch", "refs/heads/"),
        "converts": [],
        "tags": listing("tag", "refs/tags/"),
        "pullRequests": [],
    }


@router.post("/branch/{branch}")
def create_branch(
    repo: WritableRepo, store: Store, branch: str, body: BranchBody | None = None
) -> dict:
    store.create_ref(repo, "branch", branch, (body and body.startingPoint) or "main")
    return {}


@router.delete("/branch/{branch}")
def delete_branch(repo: WritableRepo, store: Store, branch: str) -> dict:
    store.delete_ref(repo, "branch", branch)
    return {}


@router.post("/tag/{revision}")
def create_tag(repo: WritableRepo, store: Store, revision: str, body: TagBody) -> dict:
    store.create_ref(repo, "tag", body.tag, revision)
    return {}


@router.delete("/tag/{tag}")
def delete_tag(repo: WritableRepo, store: Store, tag: str) -> dict:
    store.delete_ref(repo, "tag", tag)
    return {}
