"""The naming rules of the store, the Hub's: repo ids, branch and tag names, file paths.

Every name is checked here, once, whether it comes from an HTTP request or a local push, so a repo
pushed to a local folder can always be served by ``quiver hub serve`` and pushed to the Hub.
"""

from __future__ import annotations

import re

from quiver.errors import InvalidInputError

# The Hub's rule: letters, digits, '-', '_', '.'; at most 96; no '-' or '.' first or last.
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# Git's rules for a branch or tag name (git check-ref-format), as the Hub applies them.
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|//|@\{|^[/.-]|[/.]$|\.lock$|/\.")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME_HINT = "use letters, digits, '-', '_' and '.', not starting or ending with '-' or '.'"
RESERVED_NAMESPACES = frozenset({"api", "models", "datasets", "spaces"})


def is_name(value: object) -> bool:
    return (
        isinstance(value, str)
        and bool(_NAME.match(value))
        and ".." not in value
        and "--" not in value
    )


def check_name(value: str, what: str) -> str:
    """A namespace, repo name, user, org, or a name inside a repo (an expert, an artifact)."""
    if not is_name(value):
        raise InvalidInputError(f"invalid {what} {value!r}", hint=_NAME_HINT)
    return value


def check_repo_id(repo_id: str) -> str:
    """``namespace/name``, each part a valid name."""
    namespace, _, name = repo_id.partition("/") if isinstance(repo_id, str) else ("", "", "")
    if not (is_name(namespace) and is_name(name)):
        raise InvalidInputError(
            f"invalid repo id {repo_id!r}",
            hint=f"use 'namespace/name'; {_NAME_HINT}",
            repo_id=repo_id if isinstance(repo_id, str) else None,
        )
    return repo_id


def is_sha(value: str) -> bool:
    """A full commit sha: 40 lowercase hexadecimal digits."""
    return bool(_SHA.match(value))


def is_sha256(value: str) -> bool:
    return bool(_SHA256.match(value))


def check_ref_name(name: str, what: str = "branch or tag") -> str:
    """Refuse a branch or tag name git (and so the Hub) would refuse, and one shaped like a
    commit sha: it would shadow the commit it looks like, which must stay addressable."""
    if not isinstance(name, str) or not name or name == "@" or _BAD_REF.search(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}",
            hint="use letters, digits, '-', '_', '.' and '/' (no spaces, '..', '~', '^', ':', "
            "'?', '*', '[' or '\\'; not starting with '-', '.' or '/')",
            revision=name if isinstance(name, str) else None,
        )
    if is_sha(name.lower()):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: it looks like a commit sha",
            hint="pick a name that is not 40 hexadecimal digits",
            revision=name,
        )
    return name


def check_path(path: str) -> str:
    """A clean relative POSIX path inside a repo; the error says what is wrong with any other."""
    if not isinstance(path, str) or not path:
        raise InvalidInputError(f"invalid file path {path!r}: a path is a non-empty string")
    parts = path.split("/")
    problems = (
        (len(path) > 1000, "it is longer than 1000 characters", "use a shorter path"),
        ("\0" in path, "it contains a NUL byte", "remove it"),
        ("\\" in path, "it contains a backslash", "separate folders with '/'"),
        (path.startswith("/"), "it is absolute", "use a path relative to the repo's root"),
        (any(p in (".", "..") for p in parts), "'.' and '..' segments are not allowed", None),
        ("" in parts, "it has an empty segment ('//' or a trailing '/')", "drop the extra '/'"),
        (".git" in parts, "'.git' is reserved", "rename that folder"),
        (not _is_utf8(path), "it is not valid UTF-8", "rename the file"),
    )
    for wrong, reason, hint in problems:
        if wrong:
            raise InvalidInputError(f"invalid file path {path!r}: {reason}", hint=hint)
    return path


def _is_utf8(text: str) -> bool:
    """False for a name that came from the disk with bytes that are not UTF-8 (surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
