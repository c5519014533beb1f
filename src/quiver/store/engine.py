"""The versioned repo store: repos, commits, branches and tags, files and card metadata in SQLite
(``store.sqlite``), contents in content-addressed blobs. The local registry uses it in-process and
``quiver hub serve`` serves it over HTTP: a folder written by one is read by the other.

A commit is atomic: its blobs are written first (each whole and durable, so a leftover blob is
harmless), then one SQLite transaction records the commit, its full file list and the branch move;
SQLite runs in WAL mode with ``synchronous=FULL``, so a recorded commit survives a power cut. A
crash leaves the commit wholly there or wholly absent. History is immutable: commits are never
rewritten; only branches and tags move.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from quiver.errors import AlreadyExistsError, IntegrityError, InvalidInputError, RegistryError
from quiver.fs import fsync_dir
from quiver.store.blobs import BlobStore
from quiver.store.cards import card_tags, read_card, search_text
from quiver.store.errors import (
    EntryNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    StaleParentError,
    typed_disk_errors,
)
from quiver.store.names import (
    RESERVED_NAMESPACES,
    check_ref_name,
    is_sha,
)
from quiver.store.records import Commit, Deletion, FileEntry, Repo, RepoKey
from quiver.store.staging import Staging

README = "README.md"
_DATABASE = "store.sqlite"
SHORT_SHA = 7  # the shortest commit sha prefix that resolves, as git abbreviates
MAX_CARD_BYTES = 1 << 20  # a README.md beyond this is stored, but not indexed as a card
_FILE_COLUMNS = "path, size, sha256, oid, lfs"
_HEADS = (
    "SELECT r.*, c.sha, c.parent, c.author, c.date, c.title, c.message, c.card FROM repos r "
    "JOIN refs f ON f.repo = r.id AND f.kind = 'branch' AND f.name = 'main' "
    "JOIN commits c ON c.repo = r.id AND c.sha = f.target "
    "JOIN cards s ON s.repo = r.id "
)
# Repo names compare case-insensitively, as on the Hub: one repo per name, whatever its casing.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (id INTEGER PRIMARY KEY, type TEXT NOT NULL,
    namespace TEXT NOT NULL COLLATE NOCASE, name TEXT NOT NULL COLLATE NOCASE,
    private INTEGER NOT NULL, created_at TEXT NOT NULL, UNIQUE (type, namespace, name));
CREATE TABLE IF NOT EXISTS commits (repo INTEGER NOT NULL, sha TEXT NOT NULL, parent TEXT,
    author TEXT NOT NULL, date TEXT NOT NULL, title TEXT NOT NULL, message TEXT NOT NULL,
    card TEXT, PRIMARY KEY (repo, sha));
CREATE INDEX IF NOT EXISTS commits_by_sha ON commits (sha);
CREATE TABLE IF NOT EXISTS files (repo INTEGER NOT NULL, commit_sha TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, oid TEXT NOT NULL,
    lfs INTEGER NOT NULL, PRIMARY KEY (repo, commit_sha, path));
CREATE INDEX IF NOT EXISTS files_by_blob ON files (sha256);
CREATE TABLE IF NOT EXISTS refs (repo INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    target TEXT NOT NULL, PRIMARY KEY (repo, kind, name));
CREATE TABLE IF NOT EXISTS cards (repo INTEGER PRIMARY KEY, tags TEXT NOT NULL,
    text TEXT NOT NULL);
"""


def now_iso() -> str:
    """The Hub's date format: ISO 8601, milliseconds, trailing Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class RepoStore:
    """Repos, commits, refs, files and card metadata of one folder."""

    SCHEMA = _SCHEMA  # a subclass may add its own tables

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.snapshots = self.root / "snapshots"
        self.db_path = self.root / _DATABASE
        if self.root.exists() and not self.root.is_dir():
            raise InvalidInputError(
                f"the store root {self.root} is a file, not a folder",
                hint="pass a folder (it is created if missing)",
            )
        try:
            with typed_disk_errors(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
                self.snapshots.mkdir(exist_ok=True)
                self.blobs = BlobStore(self.root)
                with self._connect() as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(self.SCHEMA)
        except (OSError, sqlite3.DatabaseError) as error:
            reason = getattr(error, "strerror", None) or error
            raise RegistryError(
                f"cannot open the store at {self.root}: {reason}",
                hint="check the path and its permissions",
            ) from error

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        """Whether ``root`` holds a store already."""
        return (Path(root) / _DATABASE).is_file()

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that makes each commit durable; a full disk raises ``StorageFullError``."""
        with typed_disk_errors(self.root):
            db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
            db.row_factory = sqlite3.Row
            try:
                db.execute("PRAGMA synchronous=FULL")
                yield db
            finally:
                db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialised with every other writer (BEGIN IMMEDIATE), rolled
        back whole on any error."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def staging(self) -> Staging:
        """Stage the files of one write: ``with store.staging() as staging:`` stage, then commit
        before the block ends. Waits while a garbage collection is deleting."""
        return Staging(self.blobs)

    # -- repos -------------------------------------------------------------------------------

    def create_repo(
        self,
        key: RepoKey,
        *,
        author: str,
        private: bool = False,
        files: Sequence[FileEntry] = (),
    ) -> Repo:
        """A new repo; with ``files`` (staged), its ``main`` starts with them as a first commit."""
        with self._transaction() as db:
            repo = self._insert_repo(db, key, private=private)
            if files:
                tree = {entry.path: entry for entry in files}
                self._record_commit(db, repo, "main", None, tree, "initial commit", "", author)
        return repo

    def _insert_repo(self, db: sqlite3.Connection, key: RepoKey, *, private: bool) -> Repo:
        if key.namespace.lower() in RESERVED_NAMESPACES:
            raise InvalidInputError(
                f"{key.namespace!r} is a reserved namespace", hint="pick another one"
            )
        try:
            db.execute(
                "INSERT INTO repos (type, namespace, name, private, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (key.type, key.namespace, key.name, int(private), now_iso()),
            )
        except sqlite3.IntegrityError:
            existing = self._repo_row(db, key)  # the same name, maybe in another casing
            repo_id = existing.key.id if existing else key.id
            raise AlreadyExistsError(
                f"You already created this {key.type} repo: {repo_id}",
                hint="pass exist_ok=True or pick another name",
                repo_id=repo_id,
            ) from None
        return self._repo_row(db, key)

    def delete_repo(self, key: RepoKey) -> None:
        """Delete a repo, its history and (unless another repo shares them) its snapshots."""
        with self._transaction() as db:
            repo = self._require_repo(db, key)
            query = "SELECT sha FROM commits WHERE repo = ?"
            commits = [row["sha"] for row in db.execute(query, (repo.rowid,))]
            for table in ("commits", "files", "refs", "cards"):
                db.execute(f"DELETE FROM {table} WHERE repo = ?", (repo.rowid,))
            db.execute("DELETE FROM repos WHERE id = ?", (repo.rowid,))
        with self._connect() as db:
            orphans = [sha for sha in commits if not self._commit_exists(db, sha)]
        for sha in orphans:
            shutil.rmtree(self.snapshots / sha, ignore_errors=True)

    def set_private(self, key: RepoKey, private: bool) -> None:
        with self._transaction() as db:
            repo = self._require_repo(db, key)
            db.execute("UPDATE repos SET private = ? WHERE id = ?", (int(private), repo.rowid))

    def get_repo(self, key: RepoKey) -> Repo | None:
        with self._connect() as db:
            return self._repo_row(db, key)

    def search(
        self,
        repo_type: str = "model",
        *,
        tags: Collection[str] = (),
        author: str | None = None,
        id_contains: str | None = None,
        text_contains: str | None = None,
        visible_to: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[tuple[Repo, Commit]]:
        """Repos with the head of their ``main``, newest first: those whose card has all of
        ``tags``, in ``author``'s namespace, whose id or search text contains the given text
        (case-insensitively), and, when ``visible_to`` names namespaces, public or in one of them.
        """
        sql, params = _HEADS + "WHERE r.type = ?", [repo_type]
        for tag in tags:
            sql += " AND EXISTS (SELECT 1 FROM json_each(s.tags) WHERE value = ?)"
            params.append(tag)
        if author is not None:
            sql += " AND r.namespace = ?"
            params.append(author)
        if id_contains:
            sql += " AND r.namespace || '/' || r.name LIKE ? ESCAPE '\\'"
            params.append(f"%{_escape_like(id_contains)}%")
        if text_contains:
            sql += " AND s.text LIKE ? ESCAPE '\\'"
            params.append(f"%{_escape_like(text_contains)}%")
        if visible_to is not None:
            sql += f" AND (r.private = 0 OR r.namespace IN ({', '.join('?' * len(visible_to))}))"
            params += list(visible_to)
        sql += " ORDER BY c.date DESC, r.namespace, r.name"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._connect() as db:
            rows = db.execute(sql, params).fetchall()
        return [(_repo(row), _commit(row)) for row in rows]

    @staticmethod
    def _repo_row(db: sqlite3.Connection, key: RepoKey) -> Repo | None:
        row = db.execute(
            "SELECT * FROM repos WHERE type = ? AND namespace = ? AND name = ?",
            (key.type, key.namespace, key.name),
        ).fetchone()
        return None if row is None else _repo(row)

    def _require_repo(self, db: sqlite3.Connection, key: RepoKey) -> Repo:
        repo = self._repo_row(db, key)
        if repo is None:
            raise RepoNotFoundError(f"Repository {key.id} not found", repo_id=key.id)
        return repo

    @staticmethod
    def _commit_exists(db: sqlite3.Connection, sha: str) -> bool:
        return db.execute("SELECT 1 FROM commits WHERE sha = ?", (sha,)).fetchone() is not None

    def referenced_blobs(self) -> set[str]:
        """The sha256 of every blob some commit of some repo references."""
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT DISTINCT sha256 FROM files")}

    def commit_shas(self) -> set[str]:
        """The sha of every commit of every repo."""
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT DISTINCT sha FROM commits")}

    # -- revisions and files -----------------------------------------------------------------

    def resolve(self, repo: Repo, revision: str) -> str:
        """The commit sha a branch, a tag, a full commit sha or a unique prefix of at least
        ``SHORT_SHA`` hex digits names (refs first, as git does)."""
        with self._connect() as db:
            return self._resolve(db, repo, revision)

    @staticmethod
    def _resolve(db: sqlite3.Connection, repo: Repo, revision: str) -> str:
        for kind in ("branch", "tag"):
            row = db.execute(
                "SELECT target FROM refs WHERE repo = ? AND kind = ? AND name = ?",
                (repo.rowid, kind, revision),
            ).fetchone()
            if row is not None:
                return row["target"]
        matches = []
        if len(revision) >= SHORT_SHA and is_sha(revision.ljust(40, "0")):
            matches = db.execute(
                "SELECT sha FROM commits WHERE repo = ? AND sha >= ? AND sha < ? LIMIT 2",
                (repo.rowid, revision, revision + "g"),
            ).fetchall()
        if len(matches) == 1:
            return matches[0]["sha"]
        ambiguous = f" (it is the prefix of {len(matches)} commits)" if matches else ""
        raise RevisionNotFoundError(
            f"Invalid rev id: {revision}{ambiguous}",
            hint="use a branch, a tag or a commit sha",
            repo_id=repo.key.id,
            revision=revision,
        )

    def commit_info(self, repo: Repo, sha: str) -> Commit:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM commits WHERE repo = ? AND sha = ?", (repo.rowid, sha)
            ).fetchone()
        return _commit(row)

    def files(self, repo: Repo, sha: str) -> dict[str, FileEntry]:
        """The complete file list of a commit, by path."""
        with self._connect() as db:
            return self._files(db, repo, sha)

    def file(self, repo: Repo, sha: str, path: str) -> FileEntry | None:
        """One file of a commit: a primary-key lookup, whatever the size of the repo."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE repo = ? AND commit_sha = ? AND path = ?",
                (repo.rowid, sha, path),
            ).fetchone()
        return None if row is None else _file_entry(row)

    @staticmethod
    def _files(db: sqlite3.Connection, repo: Repo, sha: str) -> dict[str, FileEntry]:
        rows = db.execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE repo = ? AND commit_sha = ? ORDER BY path",
            (repo.rowid, sha),
        ).fetchall()
        return {row["path"]: _file_entry(row) for row in rows}

    def history(self, repo: Repo, sha: str) -> list[Commit]:
        """Commits reachable from ``sha``, newest first."""
        with self._connect() as db:
            rows = {
                row["sha"]: _commit(row)
                for row in db.execute("SELECT * FROM commits WHERE repo = ?", (repo.rowid,))
            }
        chain: list[Commit] = []
        current: str | None = sha
        while current is not None:
            chain.append(rows[current])
            current = rows[current].parent
        return chain

    def snapshot(self, repo: Repo, sha: str) -> Path:
        """A folder holding the files of a commit (``snapshots/<sha>/``, hard links to the
        read-only blobs), made on first use and renamed into place whole."""
        target = self.snapshots / sha
        if target.is_dir():
            return target
        files = self.files(repo, sha)
        with self.blobs.lease(), typed_disk_errors(self.root):
            staging = Path(tempfile.mkdtemp(dir=self.blobs.tmp))
            try:
                self._link_files(staging, files, where=f"{repo.key.id}@{sha}")
                os.rename(staging, target)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise  # else another reader made the same snapshot first
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        fsync_dir(self.snapshots)
        return target

    def _link_files(self, folder: Path, files: dict[str, FileEntry], *, where: str) -> None:
        for path, entry in files.items():
            destination = folder / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.blobs.path(entry.sha256), destination)
            except FileNotFoundError:
                raise IntegrityError(
                    f"the store at {self.root} lost {path} of {where}", hint="push it again"
                ) from None
        for child in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
            fsync_dir(child)

    # -- writing -----------------------------------------------------------------------------

    def commit(
        self,
        key: RepoKey,
        branch: str,
        *,
        additions: Sequence[FileEntry],
        deletions: Sequence[Deletion] = (),
        title: str,
        message: str = "",
        author: str,
        parent_commit: str | None = None,
    ) -> str:
        """Apply one commit (staged additions, deletions) to an existing ``branch`` atomically;
        return its sha. With ``parent_commit`` the commit is refused (``StaleParentError``) if the
        branch has moved since."""
        if parent_commit is not None and not is_sha(parent_commit):
            raise InvalidInputError(
                f"parentCommit {parent_commit!r} is not a full commit sha",
                hint="send the 40-character sha the branch was at, or no parentCommit",
            )
        with self._transaction() as db:
            repo = self._require_repo(db, key)
            head = self._head(db, repo, branch)
            if head is None:
                raise RevisionNotFoundError(
                    f"Invalid rev id: {branch}",
                    hint="commit to an existing branch (create it first)",
                    repo_id=key.id,
                    revision=branch,
                )
            if parent_commit is not None and head != parent_commit:
                raise StaleParentError(
                    f"A commit has happened since: {branch} is at {head}, not {parent_commit}",
                    hint="refresh, re-apply your change and commit again",
                    repo_id=key.id,
                    revision=branch,
                )
            tree = _apply(self._files(db, repo, head), additions, deletions)
            return self._record_commit(db, repo, branch, head, tree, title, message, author)

    def commit_snapshot(
        self,
        key: RepoKey,
        branch: str,
        files: Sequence[FileEntry],
        *,
        title: str,
        author: str,
        replace: bool = True,
        parent_commit: str | None = None,
        new_repo: bool = False,
    ) -> str:
        """Commit ``files`` (staged) to ``branch``, creating the repo (public) and the branch
        (from ``main``) if need be; return the commit. ``replace``: they are the whole snapshot,
        else the branch's other files are kept. ``parent_commit``: refuse (``StaleParentError``)
        unless the branch (or main, for a new branch) is still there; ``new_repo``: unless the
        repo does not exist yet. Nothing changed: no new commit, the head is returned."""
        with self._transaction() as db:
            repo = self._repo_row(db, key)
            if repo is not None and new_repo:
                raise StaleParentError(
                    f"{repo.key.id} was created by another writer while committing",
                    hint="look at what it holds now, then push again",
                    repo_id=repo.key.id,
                )
            repo = repo or self._insert_repo(db, key, private=False)
            head = self._head(db, repo, branch)
            if head is None:
                check_ref_name(branch, "branch")
            parent = head or self._head(db, repo, "main")
            if parent_commit is not None and parent != parent_commit:
                raise StaleParentError(
                    f"{repo.key.id}@{branch} moved to {parent} while committing onto "
                    f"{parent_commit}",
                    hint="pull again and retry",
                    repo_id=repo.key.id,
                    revision=branch,
                )
            tree = {} if replace or parent is None else self._files(db, repo, parent)
            tree.update({entry.path: entry for entry in files})
            if head is not None and _same_tree(self._files(db, repo, head), tree):
                return head
            return self._record_commit(db, repo, branch, parent, tree, title, "", author)

    @staticmethod
    def _head(db: sqlite3.Connection, repo: Repo, branch: str) -> str | None:
        row = db.execute(
            "SELECT target FROM refs WHERE repo = ? AND kind = 'branch' AND name = ?",
            (repo.rowid, branch),
        ).fetchone()
        return None if row is None else row["target"]

    def _record_commit(
        self,
        db: sqlite3.Connection,
        repo: Repo,
        branch: str,
        parent: str | None,
        tree: dict[str, FileEntry],
        title: str,
        message: str,
        author: str,
    ) -> str:
        card, body = self._card(tree.get(README))
        date = now_iso()
        listing = "".join(f"{e.path}\0{e.oid}\n" for e in sorted(tree.values(), key=_by_path))
        text = (
            f"tree {hashlib.sha1(listing.encode()).hexdigest()}\nparent {parent}\n"
            f"author {author} {date}\n\n{title}\n\n{message}"
        )
        sha = hashlib.sha1(f"commit {len(text)}\0{text}".encode()).hexdigest()
        db.execute(
            "INSERT OR IGNORE INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (repo.rowid, sha, parent, author, date, title, message, _json_or_none(card)),
        )
        db.executemany(
            "INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(repo.rowid, sha, e.path, e.size, e.sha256, e.oid, int(e.lfs)) for e in tree.values()],
        )
        db.execute(
            "INSERT OR REPLACE INTO refs VALUES (?, 'branch', ?, ?)", (repo.rowid, branch, sha)
        )
        if branch == "main":
            db.execute(
                "INSERT OR REPLACE INTO cards VALUES (?, ?, ?)",
                (repo.rowid, json.dumps(card_tags(card)), search_text(repo.key.id, card, body)),
            )
        return sha

    def _card(self, readme: FileEntry | None) -> tuple[dict | None, str]:
        """The README's metadata and text, read inside the commit's transaction: one too big
        to be a model card is not read at all, so no writer can hold the others up with it."""
        if readme is None or readme.size > MAX_CARD_BYTES:
            return None, ""
        try:
            return read_card(self.blobs.path(readme.sha256).read_text("utf-8"))
        except UnicodeDecodeError:
            return None, ""

    # -- refs --------------------------------------------------------------------------------

    def refs(self, repo: Repo) -> dict[str, dict[str, str]]:
        """``{"branch": {name: sha}, "tag": {name: sha}}``."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT kind, name, target FROM refs WHERE repo = ? ORDER BY name", (repo.rowid,)
            ).fetchall()
        refs: dict[str, dict[str, str]] = {"branch": {}, "tag": {}}
        for row in rows:
            refs[row["kind"]][row["name"]] = row["target"]
        return refs

    def create_ref(self, repo: Repo, kind: str, name: str, revision: str) -> str:
        """Point a new branch or tag at ``revision``; refs never get silently overwritten."""
        check_ref_name(name)
        with self._transaction() as db:
            target = self._resolve(db, repo, revision)
            if db.execute(
                "SELECT 1 FROM refs WHERE repo = ? AND name = ?", (repo.rowid, name)
            ).fetchone():
                raise AlreadyExistsError(
                    f"Reference {name} already exists",
                    hint="pick another name",
                    repo_id=repo.key.id,
                    revision=name,
                )
            db.execute("INSERT INTO refs VALUES (?, ?, ?, ?)", (repo.rowid, kind, name, target))
        return target

    def delete_ref(self, repo: Repo, kind: str, name: str) -> None:
        if kind == "branch" and name == "main":
            raise InvalidInputError("the main branch cannot be deleted", repo_id=repo.key.id)
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM refs WHERE repo = ? AND kind = ? AND name = ?",
                (repo.rowid, kind, name),
            ).rowcount
        if not deleted:
            raise RevisionNotFoundError(
                f"Invalid rev id: {name}", repo_id=repo.key.id, revision=name
            )


def _apply(
    tree: dict[str, FileEntry], additions: Sequence[FileEntry], deletions: Sequence[Deletion]
) -> dict[str, FileEntry]:
    """The file list after a commit's deletions, then its additions."""
    for deletion in deletions:
        folder = deletion.path + "/"
        doomed = [p for p in tree if p.startswith(folder)] if deletion.folder else []
        if not deletion.folder and deletion.path in tree:
            doomed = [deletion.path]
        if not doomed:
            raise EntryNotFoundError(f"A file with this name doesn't exist: {deletion.path}")
        for path in doomed:
            del tree[path]
    for entry in additions:
        tree[entry.path] = entry
    return tree


def _same_tree(old: dict[str, FileEntry], new: dict[str, FileEntry]) -> bool:
    return old.keys() == new.keys() and all(old[p].sha256 == new[p].sha256 for p in old)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _by_path(entry: FileEntry) -> str:
    return entry.path


def _json_or_none(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _file_entry(row: sqlite3.Row) -> FileEntry:
    return FileEntry(row["path"], row["size"], row["sha256"], row["oid"], lfs=bool(row["lfs"]))


def _repo(row: sqlite3.Row) -> Repo:
    key = RepoKey(row["type"], row["namespace"], row["name"])
    return Repo(key, row["id"], bool(row["private"]), row["created_at"])


def _commit(row: sqlite3.Row) -> Commit:
    card = json.loads(row["card"]) if row["card"] else None
    return Commit(
        row["sha"], row["parent"], row["author"], row["date"], row["title"], row["message"], card
    )
