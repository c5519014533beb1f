"""The embedded default: a prebuilt toy-world library that ships inside the package.

``demo/base`` is the toy world's base model as a plain transformers repo (config.json,
model.safetensors, tokenizer files, card); ``demo/library`` is the MBC library built on it (one
expert per cluster, bundled, with its Arrow prototypes) and ``demo/elrea`` the ELREA library built
from the same data (a base adapter, one expert per gradient cluster, its centroids), exactly as the
registry stored them. ``install_demo`` commits all three into a registry (one commit each, so a
reader never sees half of one), offline and in well under a second; ``build_demo`` regenerates
them, seeded, through the same pipeline as the benchmark.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from quiver.errors import InvalidInputError, NotFoundError, QuiverError, RegistryError
from quiver.registry import LocalRegistry, Registry
from quiver.toyworld.pipeline import (
    BASE_NAME,
    ELREA_NAME,
    MBC_NAME,
    NAMESPACE,
    RunConfig,
    Stages,
    build_libraries,
)

DEMO_FOLDER = Path(__file__).with_name("demo")
DEMO_LIBRARY = f"{NAMESPACE}/{MBC_NAME}"
DEMO_BASE_MODEL = f"{NAMESPACE}/{BASE_NAME}"
DEMO_ELREA_LIBRARY = f"{NAMESPACE}/{ELREA_NAME}"
# Folder under DEMO_FOLDER -> repo id, in install order: the base model before the libraries
# whose manifests name it.
DEMO_REPOS = {"base": DEMO_BASE_MODEL, "library": DEMO_LIBRARY, "elrea": DEMO_ELREA_LIBRARY}
_MARKERS = {"base": "config.json", "library": "library.json", "elrea": "library.json"}
MAX_BYTES = 25 * 2**20


def _files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _holds(registry: Registry, repo_id: str, folder: Path) -> bool:
    """Whether ``repo_id``'s main branch holds exactly the files of ``folder``."""
    try:
        snapshot, _ = registry.download(repo_id)
    except NotFoundError:
        return False
    return _files(snapshot) == _files(folder)


def install_demo(registry: Registry | None = None) -> str:
    """Install the demo library, its ELREA sibling and their base model into ``registry``
    (default: the local one); return the library's repo id. Their manifests name the base
    model's repo id (``DEMO_BASE_MODEL``), stored in the same registry.

    Idempotent: when the registry already holds these exact files, nothing is written. A failure
    leaves no new repo behind and raises ``RegistryError``.
    """
    folders = {DEMO_FOLDER / name: repo_id for name, repo_id in DEMO_REPOS.items()}
    if not all((folder / _MARKERS[folder.name]).is_file() for folder in folders):
        raise NotFoundError(
            f"the prebuilt demo is missing from {DEMO_FOLDER}",
            hint="reinstall lora-quiver, or rebuild it with `quiver toyworld build`",
        )
    try:
        registry = registry or LocalRegistry()
        if all(_holds(registry, repo_id, folder) for folder, repo_id in folders.items()):
            return DEMO_LIBRARY
        _install(registry, folders)
    except OSError as error:  # a read-only folder, a full disk
        where = getattr(registry, "location", "the local registry")
        raise RegistryError(
            f"cannot install the demo library into {where}: {error}",
            hint="make the registry writable (or set QUIVER_HOME to a writable folder)",
            repo_id=DEMO_LIBRARY,
        ) from error
    return DEMO_LIBRARY


def _install(registry: Registry, folders: dict[Path, str]) -> None:
    """Each folder as its repo, in order; undo the repos this call created on failure."""
    new_repos = [repo_id for repo_id in folders.values() if not _exists(registry, repo_id)]
    try:
        for folder, repo_id in folders.items():
            registry.upload(repo_id, folder, message=f"Install the toy-world demo's {folder.name}")
    except BaseException:
        for repo_id in new_repos:
            _delete_quietly(registry, repo_id)
        raise


def _exists(registry: Registry, repo_id: str) -> bool:
    try:
        registry.refs(repo_id)
    except NotFoundError:
        return False
    return True


def _delete_quietly(registry: Registry, repo_id: str) -> None:
    with contextlib.suppress(QuiverError, OSError):  # the store is gone: nothing left to undo
        registry.delete(repo_id)


def build_demo(
    config: RunConfig | None = None,
    output: str | Path = DEMO_FOLDER,
    *,
    say: Callable[[str], None] = print,
) -> Path:
    """Regenerate the demo: the benchmark's building stages (seeded), then ``export_demo``."""
    _check_writable(Path(output).parent)  # before minutes of training, not after
    with tempfile.TemporaryDirectory(prefix="quiver-demo-build-") as scratch:
        registry = LocalRegistry(Path(scratch) / "registry")
        built = build_libraries(config or RunConfig(), registry, Stages(say))
        repos = {"base": built.base_id, "library": built.mbc_id, "elrea": built.elrea_id}
        return export_demo(registry, repos, output, say=say)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise InvalidInputError(
            f"cannot write the demo into {folder}: {error.strerror or error}",
            hint="pass an --output in a writable folder",
        ) from error


def export_demo(
    registry: Registry,
    repos: dict[str, str],
    output: str | Path = DEMO_FOLDER,
    *,
    say: Callable[[str], None] = print,
) -> Path:
    """Copy each repo of ``repos`` (folder name -> repo id: ``base``, ``library``, ``elrea``), as
    ``registry`` stores it, into ``output/<folder name>``; the old folder is replaced only once all
    is copied."""
    if set(repos) != set(DEMO_REPOS):
        raise InvalidInputError(
            f"the demo needs the repos {sorted(DEMO_REPOS)}, got {sorted(repos)}",
            hint="build them with the toy world's pipeline (build_libraries)",
        )
    output = Path(output)
    _check_writable(output.parent)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=output.parent))
    try:
        for name, repo_id in repos.items():
            snapshot, _ = registry.download(repo_id)
            shutil.copytree(snapshot, staging / name, copy_function=shutil.copyfile)
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        if size > MAX_BYTES:
            raise QuiverError(
                f"the demo would take {size / 2**20:.1f} MiB, over the package's "
                f"{MAX_BYTES / 2**20:.0f} MiB",
                hint="use a smaller base model or fewer experts",
            )
        retired = output.with_name(f".{output.name}-old")
        if output.exists():
            output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"Wrote the demo ({size / 2**20:.1f} MiB) to {output}")
    return output
