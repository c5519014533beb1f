"""The Hub registry: every call through huggingface_hub, against huggingface.co or any endpoint.

Downloads go through a Hugging Face cache (``snapshot_download``), so a second pull of a pinned
commit makes no request and ``HF_HUB_OFFLINE=1`` works after a pull. Each endpoint, huggingface.co
included, has a cache of its own under ``$QUIVER_HOME/hub-cache``, because a Hugging Face cache is
keyed by repo id only and does not record where its files came from: the normal one holds whatever
transformers, PEFT or the ``hf`` CLI fetched, from whichever endpoint ``HF_ENDPOINT`` named at the
time. So a pull only ever returns bytes that came from the endpoint it asked.
huggingface_hub's errors become Quiver's typed errors, each with a hint.
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from quiver.errors import (
    AuthenticationError,
    CardError,
    ConflictError,
    ConnectionFailedError,
    InvalidInputError,
    NotFoundError,
    RegistryError,
)
from quiver.home import quiver_home
from quiver.registry.base import (
    Registry,
    RepoSummary,
    Version,
    check_repo_id,
    commits_to_refs,
    folder_files,
    kind_of,
    tag_taken,
)
from quiver.registry.local import LocalRegistry
from quiver.store import StorageFullError

HF_HUB_URL = "https://huggingface.co"
# A URL, or a mistyped http(s) one ("http:/host"): never taken for a folder to create.
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|https?:)", re.IGNORECASE)


def normalize_endpoint(endpoint: str) -> str:
    """``endpoint`` with a lowercase scheme and host and no trailing slash."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(
            f"{endpoint!r} is not an http(s) Hub endpoint",
            hint="use a URL such as http://127.0.0.1:8000, 'hf' for huggingface.co, or a folder",
        )
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def endpoint_cache(endpoint: str) -> Path:
    """The Hugging Face cache for pulls from ``endpoint``: a folder of its own, named after the URL
    and a hash of it."""
    endpoint = normalize_endpoint(endpoint)
    parts = urlsplit(endpoint)
    readable = re.sub(r"[^A-Za-z0-9.]+", "-", f"{parts.netloc}{parts.path}").strip("-")
    digest = hashlib.sha256(endpoint.encode()).hexdigest()[:8]
    return quiver_home() / "hub-cache" / f"{readable}-{digest}"


class HubRegistry(Registry):
    """A registry on a Hugging Face Hub endpoint (huggingface.co, or a self-hosted one)."""

    def __init__(
        self,
        endpoint: str = HF_HUB_URL,
        *,
        token: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self.location = self.endpoint
        self.token = token  # None: huggingface_hub's own (HF_TOKEN, or `hf auth login`)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else endpoint_cache(self.endpoint)
        self.api = HfApi(endpoint=self.endpoint, token=token)

    @contextmanager
    def _translate_errors(
        self, what: str, repo_id: str | None = None, revision: str | None = None
    ) -> Iterator[None]:
        """Turn huggingface_hub's and httpx2's exceptions into Quiver's typed errors."""
        where = f"on {self.endpoint}"
        about = {"repo_id": repo_id, "revision": revision}
        try:
            yield
        except GatedRepoError as error:
            raise AuthenticationError(
                f"{what}: the repo is gated {where}",
                hint="accept its conditions on the Hub, then pass a --token of that account",
                **about,
            ) from error
        except RepositoryNotFoundError as error:
            raise NotFoundError(
                f"{what}: no such repo {where}",
                hint="check the name with `quiver search`; private repos need a --token",
                **about,
            ) from error
        except RevisionNotFoundError as error:
            raise NotFoundError(
                f"{what}: no such revision {where}",
                hint="use a branch, a tag or a commit id listed by `versions`",
                **about,
            ) from error
        except RemoteEntryNotFoundError as error:
            raise NotFoundError(f"{what}: a file is missing {where}", **about) from error
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError) as error:
            raise self._unreachable(what, error, about) from error
        except LocalTokenNotFoundError as error:
            raise AuthenticationError(
                f"{what}: no access token", hint="pass --token or run `hf auth login`", **about
            ) from error
        except ValueError as error:
            if not str(error).startswith("Invalid metadata in README.md"):
                raise
            raise CardError(
                f"{what}: {self.endpoint} refused the model card: {' '.join(str(error).split())}",
                hint="fix the front matter between the '---' lines of README.md",
                **about,
            ) from error
        except HfHubHTTPError as error:
            raise self._http_error(what, error, about) from error
        except OSError as error:  # last: the errors above are OSErrors too
            if error.errno is None:
                raise
            raise self._disk_error(what, error, about) from error

    def _unreachable(self, what: str, error: Exception, about: dict) -> Exception:
        """Nothing usable came back, and the cache has nothing: an endpoint that answered with an
        error (a wrong URL, a server failing) is told apart from one that did not answer."""
        if isinstance(error.__cause__, HfHubHTTPError):
            return self._http_error(what, error.__cause__, about)
        uncached = isinstance(error, LocalEntryNotFoundError)
        return ConnectionFailedError(
            f"{what}: cannot reach {self.endpoint}"
            + (" and the files are not in its local cache" if uncached else ""),
            hint="unset HF_HUB_OFFLINE to fetch them"
            if constants.HF_HUB_OFFLINE
            else "check the endpoint URL and your network",
            **about,
        )

    def _disk_error(self, what: str, error: OSError, about: dict) -> Exception:
        """The local side failing: the cache's disk full or not writable."""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFullError(
                f"{what}: no space left on the disk of {self.cache_dir}",
                hint="free some space and pull again",
                **about,
            )
        where = f": {error.filename}" if error.filename else ""
        return RegistryError(
            f"{what}: {error.strerror or error}{where}",
            hint=f"check the permissions of {self.cache_dir} and of the files pushed",
            **about,
        )

    def _http_error(self, what: str, error: HfHubHTTPError, about: dict) -> Exception:
        status = error.response.status_code
        message = (error.server_message or str(error)).splitlines()[0]
        if status in (401, 403):
            return AuthenticationError(
                f"{what}: {self.endpoint} refused the token ({status}: {message})",
                hint="pass a valid --token (or none, for public repos); "
                "pushing needs one with write access to the namespace",
                **about,
            )
        if status in (409, 412):
            return ConflictError(f"{what}: {message}", hint="pull again and retry", **about)
        return RegistryError(f"{what}: {self.endpoint} answered {status}: {message}", **about)

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
        check_repo_id(repo_id)
        folder_files(folder)  # names the Hub can hold, and no file that would block the reads
        with self._translate_errors(f"push {repo_id}", repo_id, branch):
            created = self._create_repo(repo_id)
            if new_repo and not created:
                raise ConflictError(
                    f"push {repo_id}: it was created on {self.endpoint} by another writer "
                    "while this push ran",
                    hint="look at what it holds now, then push again",
                    repo_id=repo_id,
                )
            try:
                if branch != "main":
                    self.api.create_branch(repo_id, branch=branch, exist_ok=True)
                commit = self.api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    revision=branch,
                    commit_message=message,
                    delete_patterns="*" if replace else None,
                    parent_commit=parent_commit,
                )
            except BaseException:
                if created:  # leave no empty repo behind a failed first push
                    with suppress(HfHubHTTPError, httpx2.TransportError):
                        self.api.delete_repo(repo_id)
                raise
        return commit.oid

    def _create_repo(self, repo_id: str) -> bool:
        """Create ``repo_id`` unless it exists; return whether it was created."""
        try:
            self.api.create_repo(repo_id)
        except HfHubHTTPError as error:
            if error.response.status_code != 409:
                raise
            return False
        return True

    def check_can_push(self, repo_id: str) -> None:
        namespace = check_repo_id(repo_id).split("/")[0]
        if self.token is False:
            raise AuthenticationError(
                f"pushing to {repo_id} on {self.endpoint} needs a token", hint="pass a --token"
            )
        with self._translate_errors(f"who may push to {repo_id}", repo_id):
            caller = self.api.whoami()
        role = caller.get("auth", {}).get("accessToken", {}).get("role")
        if role not in ("read", "write"):
            return  # a fine-grained token: its repo permissions are the Hub's to check
        writable = {caller.get("name"), *(org.get("name") for org in caller.get("orgs", []))}
        if role == "read" or namespace not in writable:
            raise AuthenticationError(
                f"the token of {caller.get('name')} on {self.endpoint} may not push to "
                f"{repo_id}"
                + (" (it is read-only)" if role == "read" else f" (not its namespace {namespace})"),
                hint="pass a --token with write access to that namespace, or push to your own",
                repo_id=repo_id,
            )

    def download(
        self, repo_id: str, *, revision: str | None = None, patterns: Sequence[str] | None = None
    ) -> tuple[Path, str]:
        check_repo_id(repo_id)
        with self._translate_errors(f"pull {repo_id}@{revision or 'main'}", repo_id, revision):
            folder = snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(patterns) if patterns else None,
                endpoint=self.endpoint,
                token=self.token,
                cache_dir=self.cache_dir,
            )
        return Path(folder), Path(folder).name  # the cache keeps snapshots under their commit

    def discard(self, folder: Path) -> None:
        for entry in folder.rglob("*"):
            if entry.is_symlink():  # a cache snapshot entry, pointing at a blob
                entry.resolve().unlink(missing_ok=True)
                entry.unlink()

    def files(self, repo_id: str, *, revision: str) -> list[str]:
        with self._translate_errors(f"files of {repo_id}@{revision}", repo_id, revision):
            return self.api.list_repo_files(repo_id, revision=revision)

    def tag(self, repo_id: str, tag: str, *, revision: str) -> None:
        try:
            with self._translate_errors(f"tag {repo_id}@{revision} as {tag!r}", repo_id, tag):
                self.api.create_tag(repo_id, tag=tag, revision=revision)
        except ConflictError as error:
            raise tag_taken(repo_id, tag) from error

    def refs(self, repo_id: str) -> dict[str, str]:
        with self._translate_errors(f"refs of {repo_id}", repo_id):
            refs = self.api.list_repo_refs(repo_id)
        return {ref.name: ref.target_commit for ref in [*refs.branches, *refs.tags]}

    def versions(self, repo_id: str, *, branch: str = "main") -> list[Version]:
        refs = commits_to_refs(self.refs(repo_id))
        with self._translate_errors(f"versions of {repo_id}@{branch}", repo_id, branch):
            commits = self.api.list_repo_commits(repo_id, revision=branch)
        return [
            Version(c.commit_id, c.created_at, c.title, refs.get(c.commit_id, ())) for c in commits
        ]

    def _search(
        self, *, tags: list[str], author: str | None, query: str | None, limit: int | None
    ) -> list[RepoSummary]:
        """The Hub's own search: tags as ``filter=``, and ``query`` matches repo ids."""
        with self._translate_errors("search"):
            models = list(
                self.api.list_models(
                    filter=tags or None, author=author, search=query, limit=limit, cardData=True
                )
            )
        hits = []
        for model in models:
            card_base = model.card_data.base_model if model.card_data else None
            hits.append(
                RepoSummary(
                    repo_id=model.id,
                    kind=kind_of(model.tags or ()),
                    base_model=card_base if isinstance(card_base, str) else None,
                    tags=tuple(model.tags or ()),
                    last_modified=model.last_modified,
                )
            )
        return hits

    def delete(self, repo_id: str) -> None:
        with self._translate_errors(f"delete {repo_id}", repo_id):
            self.api.delete_repo(repo_id)


def open_registry(
    spec: str | Path | None = None, *, token: str | None = None, create: bool = False
) -> Registry:
    """A registry from a spec: a folder path, an http(s) endpoint URL, "hf" for huggingface.co,
    or None for the local store under ``$QUIVER_HOME``. A folder must already be a store unless
    ``create=True`` (as for a push), so that a mistyped path fails instead of making a new one."""
    if spec is None or str(spec) == "":
        return LocalRegistry()
    spec = str(spec)
    if spec == "hf":
        return HubRegistry(HF_HUB_URL, token=token)
    if _URL_SCHEME.match(spec):
        return HubRegistry(spec, token=token)  # refuses schemes other than http(s)
    return LocalRegistry(Path(spec).expanduser(), create=create)
