"""The ``Registry`` interface: one set of operations over a local folder store or a Hub endpoint.

A store implements a few git-like primitives (commit a folder as a repo's new snapshot, download a
snapshot at a revision, tag, list versions, search, delete). Experts and libraries are built on
those, once, here and in library.py, so both stores behave the same.
"""

from __future__ import annotations

import dataclasses
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from quiver.errors import (
    ConflictError,
    IntegrityError,
    InvalidAdapterError,
    InvalidInputError,
    NotFoundError,
    RegistryError,
)
from quiver.registry.adapter import ADAPTER_CONFIG, read_adapter_config
from quiver.registry.card import EXPERT_TAG, LIBRARY_TAG, base_model_tag, task_tag
from quiver.registry.expert import EXPERT_FILES, Expert, check_hash
from quiver.store import check_path, check_ref_name, check_repo_id

LIBRARY_MANIFEST = "library.json"
HUB_FILES = (".gitattributes",)  # files a Hub adds to every repo on its own
KINDS = {"expert": EXPERT_TAG, "library": LIBRARY_TAG}
HOLDINGS = {
    "library": "a Quiver library",
    "expert": "a LoRA expert",
    "adapter": "an adapter that is not a plain LoRA",
    "model": "a model (config.json and weights)",
    "files": "files that are not a LoRA expert",
}


@contextmanager
def writing(what: str, repo_id: str) -> Iterator[None]:
    """Turn the system refusing a write (a full disk, a read-only folder) into a RegistryError."""
    try:
        yield
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise RegistryError(
            f"{what}: cannot write{where}: {error.strerror or error}",
            hint="free some disk space or fix the folder's permissions, then push again",
            repo_id=repo_id,
        ) from error


def folder_files(folder: Path) -> dict[str, Path]:
    """The files under ``folder`` by their path in a repo, each path checked as the store checks
    it (symlinks are followed). Anything else (a FIFO, a socket, a device, a broken link) is
    refused: reading it could block forever, and it has no content to publish."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        if not path.is_file():
            raise InvalidInputError(
                f"{path} is not a regular file (a FIFO, a socket, a device or a broken link)",
                hint="remove it from the folder",
            )
        files[check_path(path.relative_to(folder).as_posix())] = path
    return files


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
    def upload(
        self,
        repo_id: str,
        folder: Path,
        *,
        message: str,
        branch: str = "main",
        replace: bool = True,
        parent_commit: str | None = None,
        new_repo: bool = False,
    ) -> str:
        """Commit ``folder``'s files to ``repo_id`` on ``branch`` (a new branch starts from main);
        return the commit. ``replace``: the folder is the whole new snapshot; otherwise the files
        it does not hold are kept. ``parent_commit``: refuse with ``ConflictError`` unless the
        branch (or main, for a new branch) is still at that commit; ``new_repo``: unless the repo
        does not exist yet (two first pushes: one wins, the other is told)."""

    @abstractmethod
    def files(self, repo_id: str, *, revision: str) -> list[str]:
        """The path of every file of ``repo_id`` at ``revision``, without downloading them."""

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
        replace: bool = False,
    ) -> Expert:
        """Publish an expert (a validated PEFT folder) with its card; return it, pinned.

        Everything is checked before anything is written: the names, the expert (its config
        against its tensors, finite weights) and the target. An existing repo must hold an
        expert (a library or a model is never replaced); the files of it that a push does not
        write (a user's notes, say) are kept, unless ``replace=True``."""
        check_repo_id(repo_id)
        check_ref_name(branch, "branch")
        if tag is not None:
            check_ref_name(tag, "tag")
        if not isinstance(expert, Expert):
            expert = Expert.from_folder(expert)
        expert.check_finite()
        refs = self._refs_if_any(repo_id)
        if tag and tag in refs:
            raise tag_taken(repo_id, tag)
        head = refs.get(branch) or refs.get("main")  # a new branch starts from main
        if head is not None:
            self.require_kind(repo_id, head, "expert")
        with (
            writing(f"push {repo_id}", repo_id),
            tempfile.TemporaryDirectory(prefix="quiver-push-") as staging,
        ):
            expert.save(staging, title=repo_id, link=True)
            commit = self.upload(
                repo_id,
                Path(staging),
                message=message or f"Upload expert {repo_id}",
                branch=branch,
                replace=replace,
                parent_commit=head,
                new_repo=head is None,
            )
        if tag:
            self.tag(repo_id, tag, revision=commit)
        card = dataclasses.replace(expert.card, hashes=expert.file_hashes())
        return dataclasses.replace(expert, card=card, repo_id=repo_id, commit=commit)

    def holding(self, repo_id: str, commit: str) -> str:
        """What ``repo_id`` holds at ``commit``: "empty", "expert", "library", or (not Quiver's)
        "adapter", "model" or "files". Reads the file list and at most adapter_config.json."""
        files = set(self.files(repo_id, revision=commit))
        others = files - {*EXPERT_FILES, *HUB_FILES}
        if LIBRARY_MANIFEST in files:
            return "library"
        if ADAPTER_CONFIG in files:
            folder, _ = self.download(repo_id, revision=commit, patterns=[ADAPTER_CONFIG])
            try:
                read_adapter_config(folder, repo_id)
            except InvalidAdapterError:
                return "adapter"
            return "expert"
        if not others:
            return "empty"  # nothing, or only a card
        return "model" if "config.json" in files else "files"

    def require_kind(self, repo_id: str, commit: str, kind: str) -> str:
        """Refuse to write ``kind`` over a repo that holds something else (empty ones are fine);
        return what it holds."""
        holds = self.holding(repo_id, commit)
        if holds not in (kind, "empty"):
            raise ConflictError(
                f"{repo_id} in {self.location} holds {HOLDINGS[holds]}, not {HOLDINGS[kind]}: "
                "refusing to replace it",
                hint=f"publish under another name, or delete {repo_id} first",
                repo_id=repo_id,
                revision=commit,
            )
        return holds

    def _refs_if_any(self, repo_id: str) -> dict[str, str]:
        try:
            return self.refs(repo_id)
        except NotFoundError:
            return {}

    def check_can_push(self, repo_id: str) -> None:
        """Refuse now, before hours of training, a push to ``repo_id`` that would fail at the end:
        a malformed id, a registry that cannot be reached (and, on a Hub, a token that may not
        write to the namespace)."""
        self.head(check_repo_id(repo_id))

    def head(self, repo_id: str, branch: str = "main") -> str | None:
        """The commit ``branch`` of ``repo_id`` points at; None if there is no such repo or
        branch."""
        return self._refs_if_any(repo_id).get(branch)

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
