"""The embedded registry: a folder under ``$QUIVER_HOME`` with git-like versions and no server.

Layout: ``blobs/<sha256>`` (content-addressed, read-only), ``snapshots/<commit>/`` (one folder
per commit, hard links to blobs) and ``index.sqlite`` (commits, branches, tags, search index).
A commit is written to a temporary folder, renamed into place, and only then made visible by one
SQLite transaction, so a failed push leaves nothing a reader can see.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from quiver.errors import ConflictError, NotFoundError, QuiverError
from quiver.home import quiver_home
from quiver.registry.base import (
    Registry,
    RepoSummary,
    Version,
    check_repo_id,
    commits_to_refs,
    kind_of,
    tag_taken,
)
from quiver.registry.card import QUIVER_TAG, hub_tags, parse_card
from quiver.registry.expert import CARD, sha256_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commits (
    repo_id TEXT NOT NULL, commit_id TEXT NOT NULL, parent TEXT, message TEXT NOT NULL,
    date TEXT NOT NULL, files TEXT NOT NULL, PRIMARY KEY (repo_id, commit_id));
CREATE TABLE IF NOT EXISTS refs (
    repo_id TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL, commit_id TEXT NOT NULL,
    PRIMARY KEY (repo_id, name));
CREATE TABLE IF NOT EXISTS cards (
    repo_id TEXT PRIMARY KEY, kind TEXT NOT NULL, base_model TEXT, tags TEXT NOT NULL,
    text TEXT NOT NULL, last_modified TEXT NOT NULL);
"""
_COMMITS = "SELECT commit_id, parent, message, date FROM commits WHERE repo_id = ?"


class LocalRegistry(Registry):
    """A registry in a local folder (default: ``$QUIVER_HOME/registry``)."""

    def __init__(self, root: str | Path | None = None, *, create: bool = True) -> None:
        self.root = Path(root) if root is not None else quiver_home() / "registry"
        self.location = str(self.root)
        if not create and not (self.root / "index.sqlite").is_file():
            raise NotFoundError(
                f"no Quiver store at {self.root}",
                hint="check the path; pushing to a folder (quiver push, quiver library create) "
                "makes it a store",
            )
        for sub in ("blobs", "snapshots", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
        try:
            if write:
                db.execute("BEGIN IMMEDIATE")
            yield db
            if write:
                db.execute("COMMIT")
        except BaseException:
            if write:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # -- writing --------------------------------------------------------------------------------
    def _store_blob(self, path: Path) -> str:
        digest = sha256_file(path)
        blob = self.root / "blobs" / digest
        if not blob.exists():
            temporary = self.root / "tmp" / uuid.uuid4().hex
            try:
                shutil.copyfile(path, temporary)
                os.chmod(temporary, 0o444)
                os.replace(temporary, blob)
            finally:
                temporary.unlink(missing_ok=True)
        return digest

    def _build_snapshot(self, commit: str, files: dict[str, str]) -> None:
        target = self.root / "snapshots" / commit
        staging = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
        try:
            for relative, digest in files.items():
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.root / "blobs" / digest, destination)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def upload(
        self,
        repo_id: str,
        folder: Path,
        *,
        message: str,
        branch: str = "main",
        replace: bool = True,
        parent_commit: str | None = None,
    ) -> str:
        check_repo_id(repo_id)
        summary = self._summarize(repo_id, folder) if branch == "main" else None
        files = {
            path.relative_to(folder).as_posix(): self._store_blob(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        with self._db(write=True) as db:
            head = self._head(db, repo_id, branch)
            parent = head or self._head(db, repo_id, "main")
            if parent_commit is not None and parent != parent_commit:
                raise ConflictError(
                    f"{repo_id}@{branch} moved to {parent} while pushing onto {parent_commit}",
                    hint="pull again and retry",
                    repo_id=repo_id,
                    revision=branch,
                )
            if not replace and parent is not None:
                files = {**self._files(db, repo_id, parent), **files}
            if head is not None and self._files(db, repo_id, head) == files:
                return head  # nothing changed: no empty commit (the Hub skips those too)
            date = datetime.now(timezone.utc).isoformat()
            fingerprint = json.dumps([repo_id, parent, message, date, files], sort_keys=True)
            commit = hashlib.sha1(fingerprint.encode()).hexdigest()
            self._build_snapshot(commit, files)
            db.execute(
                "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?)",
                (repo_id, commit, parent, message, date, json.dumps(files)),
            )
            db.execute(
                "INSERT OR REPLACE INTO refs VALUES (?, ?, 'branch', ?)", (repo_id, branch, commit)
            )
            if summary is not None:
                kind, base_model, tags, text = summary
                db.execute(
                    "INSERT OR REPLACE INTO cards VALUES (?, ?, ?, ?, ?, ?)",
                    (repo_id, kind, base_model, json.dumps(tags), text, date),
                )
        return commit

    @staticmethod
    def _summarize(repo_id: str, folder: Path) -> tuple[str, str | None, list[str], str]:
        """What the search index keeps of a card: the Hub's tags, base model and free text."""
        card_path = folder / CARD
        card = parse_card(card_path.read_text(encoding="utf-8")) if card_path.is_file() else None
        metadata = card.data.to_dict() if card else {}
        tags = hub_tags(metadata)
        base_model = metadata.get("base_model")
        kind = kind_of(tags)
        section = metadata.get(QUIVER_TAG)
        described = section.get("description") if isinstance(section, dict) else card and card.text
        text = f"{repo_id}\n{described or ''}"
        return kind, base_model if isinstance(base_model, str) else None, tags, text

    def tag(self, repo_id: str, tag: str, *, revision: str) -> None:
        with self._db(write=True) as db:
            commit = self._resolve(db, repo_id, revision)
            taken = "SELECT 1 FROM refs WHERE repo_id = ? AND name = ?"
            if db.execute(taken, (repo_id, tag)).fetchone():
                raise tag_taken(repo_id, tag)
            db.execute("INSERT INTO refs VALUES (?, ?, 'tag', ?)", (repo_id, tag, commit))

    def discard(self, folder: Path) -> None:
        """Nothing to forget: snapshots are the store itself, repaired by pushing again."""

    def delete(self, repo_id: str) -> None:
        with self._db(write=True) as db:
            self._require_repo(db, repo_id)
            commits = [row[0] for row in db.execute(_COMMITS, (repo_id,))]
            for table in ("commits", "refs", "cards"):
                db.execute(f"DELETE FROM {table} WHERE repo_id = ?", (repo_id,))
        for commit in commits:
            shutil.rmtree(self.root / "snapshots" / commit, ignore_errors=True)

    # -- reading --------------------------------------------------------------------------------
    @staticmethod
    def _head(db: sqlite3.Connection, repo_id: str, branch: str) -> str | None:
        row = db.execute(
            "SELECT commit_id FROM refs WHERE repo_id = ? AND name = ? AND kind = 'branch'",
            (repo_id, branch),
        ).fetchone()
        return row[0] if row else None

    @staticmethod
    def _files(db: sqlite3.Connection, repo_id: str, commit: str) -> dict[str, str]:
        query = "SELECT files FROM commits WHERE repo_id = ? AND commit_id = ?"
        return json.loads(db.execute(query, (repo_id, commit)).fetchone()[0])

    def _require_repo(self, db: sqlite3.Connection, repo_id: str) -> None:
        if not db.execute("SELECT 1 FROM refs WHERE repo_id = ?", (repo_id,)).fetchone():
            raise NotFoundError(
                f"no repo {repo_id!r} in the local registry at {self.location}",
                hint="check the name with `quiver search`, or pass --registry",
            )

    def _resolve(self, db: sqlite3.Connection, repo_id: str, revision: str | None) -> str:
        self._require_repo(db, repo_id)
        revision = revision or "main"
        row = db.execute(
            "SELECT commit_id FROM refs WHERE repo_id = ? AND name = ?", (repo_id, revision)
        ).fetchone()
        if row:
            return row[0]
        matches = db.execute(
            "SELECT commit_id FROM commits WHERE repo_id = ? AND commit_id LIKE ?",
            (repo_id, f"{revision}%"),
        ).fetchall()
        if len(revision) >= 7 and len(matches) == 1:
            return matches[0][0]
        refs = [row[0] for row in db.execute("SELECT name FROM refs WHERE repo_id = ?", (repo_id,))]
        raise NotFoundError(
            f"{repo_id} has no revision {revision!r}",
            hint=f"use a branch or tag ({', '.join(sorted(refs))}) or a commit id",
        )

    def download(
        self, repo_id: str, *, revision: str | None = None, patterns: Sequence[str] | None = None
    ) -> tuple[Path, str]:
        check_repo_id(repo_id)
        with self._db() as db:
            commit = self._resolve(db, repo_id, revision)
        snapshot = self.root / "snapshots" / commit
        if not snapshot.is_dir():
            raise QuiverError(
                f"the local registry lost the files of {repo_id}@{commit}",
                hint=f"push {repo_id} again",
            )
        return snapshot, commit

    def files(self, repo_id: str, *, revision: str) -> list[str]:
        folder, _ = self.download(repo_id, revision=revision)
        return [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]

    def refs(self, repo_id: str) -> dict[str, str]:
        with self._db() as db:
            self._require_repo(db, repo_id)
            query = "SELECT name, commit_id FROM refs WHERE repo_id = ?"
            return dict(db.execute(query, (repo_id,)).fetchall())

    def versions(self, repo_id: str, *, branch: str = "main") -> list[Version]:
        refs = commits_to_refs(self.refs(repo_id))
        with self._db() as db:
            commit = self._resolve(db, repo_id, branch)
            rows = {row[0]: row[1:] for row in db.execute(_COMMITS, (repo_id,))}
        history = []
        while commit is not None:
            parent, message, date = rows[commit]
            history.append(
                Version(commit, datetime.fromisoformat(date), message, refs.get(commit, ()))
            )
            commit = parent
        return history

    def _search(
        self, *, tags: list[str], author: str | None, query: str | None, limit: int | None
    ) -> list[RepoSummary]:
        sql = "SELECT repo_id, kind, base_model, tags, last_modified FROM cards WHERE 1"
        params: list[object] = []
        for required in tags:
            sql += " AND EXISTS (SELECT 1 FROM json_each(cards.tags) WHERE value = ?)"
            params.append(required)
        if author:
            sql += " AND repo_id LIKE ? ESCAPE '\\'"
            params.append(_escape_like(author) + "/%")
        if query:
            sql += " AND text LIKE ? ESCAPE '\\'"
            params.append(f"%{_escape_like(query)}%")
        sql += " ORDER BY last_modified DESC, repo_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._db() as db:
            rows = db.execute(sql, params).fetchall()
        return [
            RepoSummary(repo_id, kind, base, tuple(json.loads(tags)), datetime.fromisoformat(date))
            for repo_id, kind, base, tags, date in rows
        ]


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
