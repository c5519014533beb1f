"""Storage of the self-hosted Hub: SQLite for repos, refs, commits, tokens and card metadata, and a
content-addressed blob store on disk.

A commit is atomic: its blobs are written first (content-addressed, each by temp file + rename, so a
leftover blob is harmless), then one SQLite transaction records the commit, its full file list and
the branch move. A crash leaves the commit wholly there or wholly absent. History is immutable:
commits are never rewritten; only branches and tags move.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from quiver.errors import NotFoundError
from quiver.registry.server.cards import parse_front_matter
from quiver.registry.server.errors import (
    AlreadyExists,
    EntryNotFound,
    HubError,
    RepoNotFound,
    RevisionNotFound,
    StaleParent,
)

REPO_TYPES = ("model", "dataset")
README = "README.md"
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_REF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_NAMESPACES = {"api", "models", "datasets", "spaces"}
_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
_FILE_COLUMNS = "path, size, sha256, oid, lfs"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, user TEXT NOT NULL,
    write INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (user TEXT NOT NULL, org TEXT NOT NULL, PRIMARY KEY (user, org));
CREATE TABLE IF NOT EXISTS repos (id INTEGER PRIMARY KEY, type TEXT NOT NULL,
    namespace TEXT NOT NULL, name TEXT NOT NULL, private INTEGER NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (type, namespace, name));
CREATE TABLE IF NOT EXISTS commits (repo INTEGER NOT NULL, sha TEXT NOT NULL, parent TEXT,
    author TEXT NOT NULL, date TEXT NOT NULL, title TEXT NOT NULL, message TEXT NOT NULL,
    card TEXT, PRIMARY KEY (repo, sha));
CREATE TABLE IF NOT EXISTS files (repo INTEGER NOT NULL, commit_sha TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, oid TEXT NOT NULL,
    lfs INTEGER NOT NULL,
    PRIMARY KEY (repo, commit_sha, path));
CREATE TABLE IF NOT EXISTS refs (repo INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    target TEXT NOT NULL, PRIMARY KEY (repo, kind, name));
"""


def now_iso() -> str:
    """The Hub's date format: ISO 8601, milliseconds, trailing Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value))


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``blobId``/``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value) or ".." in value or "--" in value:
        raise HubError(
            f"invalid {what} {value!r}",
            hint="use letters, digits, '-', '_' and '.', not starting or ending with '-' or '.'",
        )
    return value


def check_ref_name(value: str) -> str:
    """Refuse names git refuses, and names shaped like a commit sha: such a ref would shadow the
    commit it looks like, and every commit must stay addressable by its sha."""
    if not _REF_NAME.match(value) or ".." in value or value.endswith((".", ".lock")):
        raise HubError(
            f"invalid branch or tag name {value!r}", hint="use letters, digits, '-', '_', '.'"
        )
    if _SHA.match(value.lower()):
        raise HubError(
            f"invalid branch or tag name {value!r}: it looks like a commit sha",
            hint="pick a name that is not 40 hexadecimal digits",
        )
    return value


def check_path(path: str) -> str:
    """Refuse anything but a clean relative POSIX path: no '..', '.', empty or '.git' segments, no
    absolute paths, backslashes or NUL bytes."""
    parts = path.split("/")
    if (
        not path
        or len(path) > 1000
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..", ".git") for part in parts)
    ):
        raise HubError(f"invalid file path {path!r}", hint="use a relative path without '..'")
    return path


@dataclass(frozen=True)
class RepoKey:
    """A repo's identity: type and ``namespace/name``."""

    type: str
    namespace: str
    name: str

    def __post_init__(self) -> None:
        if self.type not in REPO_TYPES:
            raise HubError(f"unsupported repo type {self.type!r}", hint=f"use one of {REPO_TYPES}")
        check_name(self.namespace, "namespace")
        check_name(self.name, "repo name")

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Repo:
    key: RepoKey
    rowid: int
    private: bool
    created_at: str


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to and what it may do."""

    user: str
    orgs: tuple[str, ...]
    write: bool

    def owns(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. ``oid`` is the git blob sha1 (of the LFS pointer for LFS files);
    ``sha256`` addresses the content in the blob store."""

    path: str
    size: int
    sha256: str
    oid: str
    lfs: bool

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: the sha256 for LFS files, the git blob sha1 otherwise."""
        return self.sha256 if self.lfs else self.oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    author: str
    date: str
    title: str
    message: str
    card: dict | None


@dataclass(frozen=True)
class Deletion:
    path: str
    folder: bool


class BlobWriter:
    """One blob being written to a temp file; ``finish`` moves it to its content address."""

    def __init__(self, blobs: BlobStore) -> None:
        self._blobs = blobs
        fd, self._tmp_name = tempfile.mkstemp(dir=blobs.tmp)
        self._file = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self.size += len(chunk)
        self._file.write(chunk)

    def finish(self, expected_sha256: str | None = None) -> tuple[str, int]:
        """Store the blob, return (sha256, size); a wrong ``expected_sha256`` stores nothing."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha256 = self._digest.hexdigest()
        if expected_sha256 is not None and sha256 != expected_sha256:
            raise HubError(
                f"content hashes to {sha256}, not {expected_sha256}",
                hint="re-send the file; it was corrupted on the way",
            )
        target = self._blobs.path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(self._tmp_name, target)
        return sha256, self.size

    def discard(self) -> None:
        """Forget whatever was not stored (a no-op after a successful ``finish``)."""
        self._file.close()
        if os.path.exists(self._tmp_name):
            os.unlink(self._tmp_name)


class BlobStore:
    """Files addressed by sha256 under ``blobs/ab/<sha256>``, each written by temp file + rename."""

    def __init__(self, root: Path) -> None:
        self.root = root / "blobs"
        self.tmp = root / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    @contextmanager
    def writer(self) -> Iterator[BlobWriter]:
        """A blob written chunk by chunk, so no request body is ever held whole in memory."""
        blob = BlobWriter(self)
        try:
            yield blob
        finally:
            blob.discard()

    def put(self, data: bytes) -> tuple[str, int]:
        """Store ``data``, return (sha256, size)."""
        with self.writer() as blob:
            blob.write(data)
            return blob.finish()


class HubStore:
    """Repos, refs, commits, tokens and card metadata of one server root."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.db_path = self.root / "hub.sqlite"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=FULL")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, serialised with every other writer (BEGIN IMMEDIATE)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- tokens ------------------------------------------------------------------------------

    def create_token(self, user: str, *, write: bool, orgs: Iterable[str] = ()) -> str:
        """A new access token for ``user`` (made a member of ``orgs``); only its hash is kept. A
        name is a user or an org, never both: either would gain the other's namespace."""
        check_name(user, "user name")
        orgs = [check_name(org, "organization name") for org in orgs]
        token = "hf_" + secrets.token_hex(20)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM members WHERE org = ?", (user,)).fetchone():
                raise AlreadyExists(
                    f"{user!r} is an organization, not a user", hint="pick another name"
                )
            users = {row["user"] for row in db.execute("SELECT DISTINCT user FROM tokens")}
            if clash := [org for org in orgs if org in users | {user}]:
                raise AlreadyExists(
                    f"{clash[0]!r} is a user, not an organization", hint="pick another org name"
                )
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?)",
                (_digest(token), user, int(write), now_iso()),
            )
            db.executemany("INSERT OR IGNORE INTO members VALUES (?, ?)", [(user, o) for o in orgs])
        return token

    def revoke_token(self, token: str) -> None:
        """Forget a token; requests carrying it are refused from now on."""
        with self._transaction() as db:
            if not db.execute("DELETE FROM tokens WHERE digest = ?", (_digest(token),)).rowcount:
                raise NotFoundError("no such token", hint="it may have been revoked already")

    def authenticate(self, token: str) -> Principal | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT user, write FROM tokens WHERE digest = ?", (_digest(token),)
            ).fetchone()
            if row is None:
                return None
            orgs = db.execute(
                "SELECT org FROM members WHERE user = ? ORDER BY org", (row["user"],)
            ).fetchall()
        return Principal(row["user"], tuple(o["org"] for o in orgs), bool(row["write"]))

    # -- repos -------------------------------------------------------------------------------

    def create_repo(self, key: RepoKey, *, private: bool, author: str) -> Repo:
        """A new repo whose ``main`` starts with a ``.gitattributes`` commit, as on the Hub."""
        if key.namespace in _RESERVED_NAMESPACES:
            raise HubError(f"{key.namespace!r} is a reserved namespace", hint="pick another one")
        attributes = self.stage_bytes(".gitattributes", _GITATTRIBUTES)
        with self._transaction() as db:
            try:
                db.execute(
                    "INSERT INTO repos (type, namespace, name, private, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key.type, key.namespace, key.name, int(private), now_iso()),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(
                    f"You already created this {key.type} repo: {key.id}",
                    hint="pass exist_ok=True or pick another name",
                ) from None
            repo = self._repo_row(db, key)
            self._record_commit(
                db, repo, "main", None, [attributes], [], "initial commit", "", author
            )
        return repo

    def delete_repo(self, key: RepoKey) -> None:
        with self._transaction() as db:
            repo = self._repo_row(db, key)
            if repo is None:
                raise RepoNotFound(f"Repository {key.id} not found")
            for table in ("commits", "files", "refs"):
                db.execute(f"DELETE FROM {table} WHERE repo = ?", (repo.rowid,))
            db.execute("DELETE FROM repos WHERE id = ?", (repo.rowid,))

    def set_private(self, key: RepoKey, private: bool) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE repos SET private = ? WHERE type = ? AND namespace = ? AND name = ?",
                (int(private), key.type, key.namespace, key.name),
            )

    def get_repo(self, key: RepoKey) -> Repo | None:
        with self._connect() as db:
            return self._repo_row(db, key)

    def list_repos(self, repo_type: str) -> list[tuple[Repo, Commit]]:
        """Every repo of a type with the head commit of its ``main`` branch, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.*, c.sha, c.parent, c.author, c.date, c.title, c.message, c.card "
                "FROM repos r JOIN refs f "
                "ON f.repo = r.id AND f.kind = 'branch' AND f.name = 'main' "
                "JOIN commits c ON c.repo = r.id AND c.sha = f.target "
                "WHERE r.type = ? ORDER BY c.date DESC, r.namespace, r.name",
                (repo_type,),
            ).fetchall()
        return [(_repo(row), _commit(row)) for row in rows]

    @staticmethod
    def _repo_row(db: sqlite3.Connection, key: RepoKey) -> Repo | None:
        row = db.execute(
            "SELECT * FROM repos WHERE type = ? AND namespace = ? AND name = ?",
            (key.type, key.namespace, key.name),
        ).fetchone()
        return None if row is None else _repo(row)

    # -- revisions and files -----------------------------------------------------------------

    def resolve(self, repo: Repo, revision: str) -> str:
        """The commit sha a branch, tag or full commit sha names."""
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
        if (
            _SHA.match(revision)
            and db.execute(
                "SELECT 1 FROM commits WHERE repo = ? AND sha = ?", (repo.rowid, revision)
            ).fetchone()
        ):
            return revision
        raise RevisionNotFound(
            f"Invalid rev id: {revision}", hint="use a branch, tag or commit sha"
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

    # -- writing -----------------------------------------------------------------------------

    def stage_bytes(self, path: str, data: bytes) -> FileEntry:
        """Store a regular (inline) file's content and describe it."""
        sha256, size = self.blobs.put(data)
        return FileEntry(check_path(path), size, sha256, git_blob_sha1(data), lfs=False)

    def stage_lfs(self, path: str, sha256: str, size: int | None) -> FileEntry:
        """Describe an LFS file whose content was uploaded before the commit."""
        sha256 = sha256.lower()
        if not is_sha256(sha256):
            raise HubError(
                f"invalid LFS oid {sha256!r} for {path!r}", hint="send the file's sha256"
            )
        blob = self.blobs.path(sha256)
        if not blob.is_file():
            raise HubError(
                f"LFS object {sha256} of {path!r} was never uploaded",
                hint="upload it through the LFS batch endpoint before committing",
            )
        actual = blob.stat().st_size
        if size is not None and size != actual:
            raise HubError(f"LFS object {sha256} has {actual} bytes, not {size}")
        pointer = lfs_pointer(sha256, actual)
        return FileEntry(check_path(path), actual, sha256, git_blob_sha1(pointer), lfs=True)

    def commit(
        self,
        repo: Repo,
        branch: str,
        *,
        additions: list[FileEntry],
        deletions: list[Deletion],
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
    ) -> str:
        """Apply one commit to ``branch`` atomically; returns its sha. With ``parent_commit`` the
        commit is refused (``StaleParent``) if the branch has moved since."""
        if parent_commit is not None and not _SHA.match(parent_commit):
            raise HubError(
                f"parentCommit {parent_commit!r} is not a full commit sha",
                hint="send the 40-character sha the branch was at, or no parentCommit",
            )
        with self._transaction() as db:
            row = db.execute(
                "SELECT target FROM refs WHERE repo = ? AND kind = 'branch' AND name = ?",
                (repo.rowid, branch),
            ).fetchone()
            if row is None:
                raise RevisionNotFound(
                    f"Invalid rev id: {branch}",
                    hint="commit to an existing branch (create it first)",
                )
            head = row["target"]
            if parent_commit is not None and head != parent_commit:
                raise StaleParent(
                    f"A commit has happened since: {branch} is at {head}, not {parent_commit}",
                    hint="refresh, re-apply your change and commit again",
                )
            sha = self._record_commit(
                db, repo, branch, head, additions, deletions, title, message, author
            )
        return sha

    def _record_commit(
        self,
        db: sqlite3.Connection,
        repo: Repo,
        branch: str,
        parent: str | None,
        additions: list[FileEntry],
        deletions: list[Deletion],
        title: str,
        message: str,
        author: str,
    ) -> str:
        tree = self._files(db, repo, parent) if parent else {}
        for deletion in deletions:
            folder = deletion.path + "/"
            doomed = [p for p in tree if p.startswith(folder)] if deletion.folder else []
            if not deletion.folder and deletion.path in tree:
                doomed = [deletion.path]
            if not doomed:
                raise EntryNotFound(f"A file with this name doesn't exist: {deletion.path}")
            for path in doomed:
                del tree[path]
        for entry in additions:
            tree[entry.path] = entry
        card = self._card(tree.get(README))
        date = now_iso()
        listing = "".join(f"{e.path}\0{e.oid}\n" for e in sorted(tree.values(), key=_by_path))
        body = (
            f"tree {hashlib.sha1(listing.encode()).hexdigest()}\nparent {parent}\n"
            f"author {author} {date}\n\n{title}\n\n{message}"
        )
        sha = hashlib.sha1(f"commit {len(body)}\0{body}".encode()).hexdigest()
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
        return sha

    def _card(self, readme: FileEntry | None) -> dict | None:
        if readme is None:
            return None
        try:
            return parse_front_matter(self.blobs.path(readme.sha256).read_text("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None

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
                raise AlreadyExists(f"Reference {name} already exists", hint="pick another name")
            db.execute("INSERT INTO refs VALUES (?, ?, ?, ?)", (repo.rowid, kind, name, target))
        return target

    def delete_ref(self, repo: Repo, kind: str, name: str) -> None:
        if kind == "branch" and name == "main":
            raise HubError("the main branch cannot be deleted")
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM refs WHERE repo = ? AND kind = ? AND name = ?",
                (repo.rowid, kind, name),
            ).rowcount
        if not deleted:
            raise RevisionNotFound(f"Invalid rev id: {name}")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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
