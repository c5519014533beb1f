"""Who may do what on a self-hosted Hub: access tokens (only their hashes are kept) and org
memberships, in their own tables of the store's database."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from quiver.errors import AlreadyExistsError, NotFoundError
from quiver.store import RepoStore, check_name, now_iso

# User and org names compare case-insensitively, as repo names do.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, user TEXT NOT NULL COLLATE NOCASE,
    write INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (user TEXT NOT NULL COLLATE NOCASE,
    org TEXT NOT NULL COLLATE NOCASE, PRIMARY KEY (user, org));
"""


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to and what it may do."""

    user: str
    orgs: tuple[str, ...]
    write: bool

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.user, *self.orgs)

    def owns(self, namespace: str) -> bool:
        return namespace.casefold() in {name.casefold() for name in self.namespaces}


class HubStore(RepoStore):
    """The repo store of a server root, plus its tokens and org memberships."""

    SCHEMA = RepoStore.SCHEMA + _SCHEMA

    def create_token(self, user: str, *, write: bool, orgs: Iterable[str] = ()) -> str:
        """A new access token for ``user`` (made a member of ``orgs``); only its hash is kept. A
        name is a user or an org, never both: either would gain the other's namespace."""
        check_name(user, "user name")
        orgs = [check_name(org, "organization name") for org in orgs]
        token = "hf_" + secrets.token_hex(20)
        with self._transaction() as db:
            known = db.execute("SELECT user FROM tokens WHERE user = ?", (user,)).fetchone()
            user = known["user"] if known else user  # one spelling per user
            if db.execute("SELECT 1 FROM members WHERE org = ?", (user,)).fetchone():
                raise AlreadyExistsError(
                    f"{user!r} is an organization, not a user", hint="pick another name"
                )
            users = {row["user"].casefold() for row in db.execute("SELECT user FROM tokens")}
            if clash := [org for org in orgs if org.casefold() in users | {user.casefold()}]:
                raise AlreadyExistsError(
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


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
