"""The ``Registry`` interface: one set of operations over a local folder store or a Hub endpoint.

A store implements a few git-like primitives (commit a folder as a repo's new snapshot, download a
snapshot at a revision, tag, list versions, search, delete). Experts and libraries are built on
those, once, here and in library.py, so both stores behave the same.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from quiver.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from quiver.registry.card import EXPERT_TAG, LIBRARY_TAG, base_model_tag, task_tag
from quiver.registry.expert import EXPERT_FILES, Expert, check_hash

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
KINDS = {"expert": EXPERT_TAG, "library": LIBRARY_TAG}


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise InvalidInputError(
            f"invalid repo id {repo_id!r}",
            hint="use 'namespace/name' with letters, digits, '-', '_' or '.'",
            repo_id=repo_id,
        )
    return repo_id


@dataclass(frozen=True)
class RepoSummary:
    """One hit of ``search``/``list``."""

    repo_id: str
    kind: str
    base_model: str | None
    tags: tuple[str, ...]
    last_modified: datetime | None = None

    @property
    def author(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def tasks(self) -> tuple[str, ...]:
        prefix = task_tag("")
        return tuple(tag[len(prefix) :] for tag in self.tags if tag.startswith(prefix))


@dataclass(frozen=True)
class Version:
    """One commit of a repo, newest first in ``versions``; ``refs`` are its branches and tags."""

    commit: str
    date: datetime
    message: str
    refs: tuple[str, ...] = ()


def tag_taken(repo_id: str, tag: str) -> ConflictError:
    return ConflictError(
        f"{repo_id} already has a branch or tag named {tag!r}",
        hint="tags are immutable: pick a new tag name",
        repo_id=repo_id,
        revision=tag,
    )


def commits_to_refs(refs: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Invert ``{ref name: commit}`` into ``{commit: (ref names, sorted)}``."""
    names: dict[str, tuple[str, ...]] = {}
    for name, commit in sorted(refs.items()):
        names[commit] = (*names.get(commit, ()), name)
    return names


def kind_of(tags: Sequence[str]) -> str:
    """What a repo is, from its Hub tags: a library, an expert (a LoRA), or another model."""
    if LIBRARY_TAG in tags:
        return "library"
    return "expert" if {EXPERT_TAG, "peft"} & set(tags) else "model"


class Registry(ABC):
    """Where experts and libraries are published and pulled from."""

    location: str

    # -- store primitives -------------------------------------------------------------------
    @abstractmethod
    def upload(self, repo_id: str, folder: Path, *, message: str, branch: str = "main") -> str:
        """Make ``folder``'s files the snapshot of ``repo_id`` on ``branch``; return the commit."""

    @abstractmethod
    def download(
        self, repo_id: str, *, revision: str | None = None, patterns: Sequence[str] | None = None
    ) -> tuple[Path, str]:
        """Fetch the files matching ``patterns`` at ``revision``; return (folder, commit)."""

    @abstractmethod
    def tag(self, repo_id: str, tag: str, *, revision: str) -> None:
        """Point the tag ``tag`` at ``revision``."""

    @abstractmethod
    def refs(self, repo_id: str) -> dict[str, str]:
        """Every branch and tag of ``repo_id``, by name, with the commit it points at."""

    @abstractmethod
    def versions(self, repo_id: str, *, branch: str = "main") -> list[Version]:
        """The commits of ``branch``, newest first."""

    @abstractmethod
    def _search(
        self, *, tags: list[str], author: str | None, query: str | None, limit: int | None
    ) -> list[RepoSummary]:
        """Repos whose Hub tags include all of ``tags``, by ``author``, matching ``query``."""

    @abstractmethod
    def delete(self, repo_id: str) -> None:
        """Delete a repo and all its versions."""

    # -- experts ----------------------------------------------------------------------------
    def search(
        self,
        *,
        base_model: str | None = None,
        task: str | None = None,
        tag: str | None = None,
        author: str | None = None,
        query: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> list[RepoSummary]:
        """Repos matching every given filter. Base model, task, tag and kind are Hub tags, so both
        stores filter alike; ``query`` is free text (the Hub matches it against repo ids only)."""
        if kind is not None and kind not in KINDS:
            raise InvalidInputError(f"unknown kind {kind!r}", hint=f"use one of {sorted(KINDS)}")
        tags = [base_model_tag(base_model)] if base_model else []
        tags += [task_tag(task)] if task else []
        tags += [tag] if tag else []
        tags += [KINDS[kind]] if kind else []
        return self._search(tags=tags, author=author, query=query, limit=limit)

    def list(
        self, *, kind: str | None = None, author: str | None = None, limit: int | None = None
    ) -> list[RepoSummary]:
        """Every repo (of ``kind``, of ``author``). On huggingface.co, pass an author or a limit:
        the whole Hub is millions of repos."""
        return self.search(kind=kind, author=author, limit=limit)

    def push(
        self,
        expert: Expert | str | Path,
        repo_id: str,
        *,
        branch: str = "main",
        tag: str | None = None,
        message: str | None = None,
    ) -> Expert:
        """Publish an expert (a validated PEFT folder) with its card; return it, pinned."""
        check_repo_id(repo_id)
        if not isinstance(expert, Expert):
            expert = Expert.from_folder(expert)
        expert.check_finite()
        if tag and tag in self._refs_if_any(repo_id):  # refuse before anything is written
            raise tag_taken(repo_id, tag)
        with tempfile.TemporaryDirectory(prefix="quiver-push-") as staging:
            expert.save(staging, title=repo_id)
            commit = self.upload(
                repo_id, Path(staging), message=message or f"Upload expert {repo_id}", branch=branch
            )
        if tag:
            self.tag(repo_id, tag, revision=commit)
        card = dataclasses.replace(expert.card, hashes=expert.file_hashes())
        return dataclasses.replace(expert, card=card, repo_id=repo_id, commit=commit)

    def _refs_if_any(self, repo_id: str) -> dict[str, str]:
        try:
            return self.refs(repo_id)
        except NotFoundError:
            return {}

    def pull(self, repo_id: str, *, revision: str | None = None) -> Expert:
        """Fetch an expert at ``revision`` (branch, tag or commit; default main) and validate it."""
        check_repo_id(repo_id)
        folder, commit = self.download(repo_id, revision=revision, patterns=EXPERT_FILES)
        return self.open_expert(folder, repo_id=repo_id, commit=commit)

    def open_expert(
        self,
        folder: Path,
        *,
        repo_id: str | None = None,
        commit: str | None = None,
        sha256: str | None = None,
    ) -> Expert:
        """Validate a downloaded expert (and its pinned weight ``sha256``, if given). On a hash
        mismatch, the files are dropped from any cache first, so that a new pull fetches them."""
        try:
            expert = Expert.from_folder(folder, repo_id=repo_id, commit=commit)
            if sha256 is not None:
                check_hash(f"expert {expert.name!r}", expected=sha256, actual=expert.weights_sha256)
        except IntegrityError:
            self.discard(folder)
            raise
        return expert

    @abstractmethod
    def discard(self, folder: Path) -> None:
        """Forget downloaded files that failed verification."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
