"""The embedded registry: a folder under ``$QUIVER_HOME`` with git-like versions and no server.

The folder is a ``quiver.store`` repo store, the same that ``quiver hub serve --root`` serves: a
registry folder can be served as is, and a served folder read locally. A pull returns the commit's
snapshot folder (``snapshots/<commit>/``, hard links to the read-only blobs, made on first use).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from quiver.errors import AlreadyExistsError, NotFoundError
from quiver.home import quiver_home
from quiver.registry.base import (
    Registry,
    RepoSummary,
    Version,
    commits_to_refs,
    folder_files,
    kind_of,
    tag_taken,
)
from quiver.store import (
    Repo,
    RepoKey,
    RepoNotFoundError,
    RepoStore,
    RevisionNotFoundError,
    card_tags,
)


class LocalRegistry(Registry):
    """A registry in a local folder (default: ``$QUIVER_HOME/registry``)."""

    def __init__(self, root: str | Path | None = None, *, create: bool = True) -> None:
        self.root = Path(root) if root is not None else quiver_home() / "registry"
        self.location = str(self.root)
        if not create and not RepoStore.exists(self.root):
            raise NotFoundError(
                f"no Quiver store at {self.root}",
                hint="check the path; pushing to a folder (quiver push, quiver library create) "
                "makes it a store",
            )
        self.store = RepoStore(self.root)

    @contextmanager
    def _errors(self, repo_id: str, revision: str | None = None) -> Iterator[None]:
        """The store's refusals in the local registry's words."""
        try:
            yield
        except RepoNotFoundError:
            raise NotFoundError(
                f"no repo {repo_id!r} in the local registry at {self.location}",
                hint="check the name with `quiver search`, or pass --registry",
                repo_id=repo_id,
            ) from None
        except RevisionNotFoundError:
            refs = ", ".join(sorted(self.refs(repo_id)))
            raise NotFoundError(
                f"{repo_id} has no revision {revision!r}",
                hint=f"use a branch or tag ({refs}) or a commit id",
                repo_id=repo_id,
                revision=revision,
            ) from None

    def _repo(self, repo_id: str) -> Repo:
        key = RepoKey.parse(repo_id)
        repo = self.store.get_repo(key)
        if repo is None:
            raise RepoNotFoundError(f"Repository {repo_id} not found", repo_id=repo_id)
        return repo

    # -- writing --------------------------------------------------------------------------------
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
        key = RepoKey.parse(repo_id)
        listing = folder_files(folder)
        with self.store.staging() as staging:
            files = [staging.add_file(name, path) for name, path in listing.items()]
            return self.store.commit_snapshot(
                key,
                branch,
                files,
                title=message,
                author=key.namespace,
                replace=replace,
                parent_commit=parent_commit,
                new_repo=new_repo,
            )

    def tag(self, repo_id: str, tag: str, *, revision: str) -> None:
        with self._errors(repo_id, revision):
            try:
                self.store.create_ref(self._repo(repo_id), "tag", tag, revision)
            except AlreadyExistsError as error:
                raise tag_taken(repo_id, tag) from error

    def discard(self, folder: Path) -> None:
        """Drop the snapshot folder holding ``folder``: the next pull links it anew from the
        blobs (and fails again only if a blob itself is damaged; pushing again repairs that)."""
        snapshots = self.store.snapshots.resolve()
        for path in (folder.resolve(), *folder.resolve().parents):
            if path.parent == snapshots:
                shutil.rmtree(path, ignore_errors=True)
                return

    def delete(self, repo_id: str) -> None:
        with self._errors(repo_id):
            self.store.delete_repo(RepoKey.parse(repo_id))

    # -- reading --------------------------------------------------------------------------------
    def download(
        self, repo_id: str, *, revision: str | None = None, patterns: Sequence[str] | None = None
    ) -> tuple[Path, str]:
        with self._errors(repo_id, revision):
            repo = self._repo(repo_id)
            commit = self.store.resolve(repo, revision or "main")
        return self.store.snapshot(repo, commit), commit

    def files(self, repo_id: str, *, revision: str) -> list[str]:
        with self._errors(repo_id, revision):
            repo = self._repo(repo_id)
            return list(self.store.files(repo, self.store.resolve(repo, revision)))

    def refs(self, repo_id: str) -> dict[str, str]:
        with self._errors(repo_id):
            refs = self.store.refs(self._repo(repo_id))
        return {**refs["branch"], **refs["tag"]}

    def versions(self, repo_id: str, *, branch: str = "main") -> list[Version]:
        refs = commits_to_refs(self.refs(repo_id))
        with self._errors(repo_id, branch):
            repo = self._repo(repo_id)
            history = self.store.history(repo, self.store.resolve(repo, branch))
        return [Version(c.sha, c.datetime, c.title, refs.get(c.sha, ())) for c in history]

    def _search(
        self, *, tags: list[str], author: str | None, query: str | None, limit: int | None
    ) -> list[RepoSummary]:
        hits = []
        for repo, head in self.store.search(
            tags=tags, author=author, text_contains=query, limit=limit
        ):
            repo_tags = card_tags(head.card)
            base = (head.card or {}).get("base_model")
            hits.append(
                RepoSummary(
                    repo.key.id,
                    kind_of(repo_tags),
                    base if isinstance(base, str) else None,
                    tuple(repo_tags),
                    head.datetime,
                )
            )
        return hits
