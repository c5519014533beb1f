"""A library: a named, shareable set of LoRA experts for one base model, pinned in ``library.json``.

Every expert is pinned by the sha256 of its weights and either referenced (another repo of the same
registry, at a commit) or bundled in the library repo under ``experts/<name>/`` (loadable by PEFT as
``user/repo/experts/<name>``). Optional routing artifacts (safetensors files such as Arrow
prototypes) live under ``artifacts/``. Every change commits a new version of the library repo.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from quiver.errors import (
    AlreadyExistsError,
    CardError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    QuiverError,
)
from quiver.registry.base import (
    HOLDINGS,
    LIBRARY_MANIFEST,
    Registry,
    Version,
    check_repo_id,
    writing,
)
from quiver.registry.card import LIBRARY_TAG, QUIVER_TAG, base_model_tag
from quiver.registry.expert import CARD, EXPERT_FILES, Expert, check_hash, sha256_file
from quiver.store import check_name, is_sha, is_sha256

MANIFEST = LIBRARY_MANIFEST
FORMAT = "quiver-library/1"

_LIBRARY_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

A Quiver library of {{ experts | length }} LoRA experts for {{ base_model }}.

| expert | source | weights sha256 |
|---|---|---|
{% for pin in experts -%}
| {{ pin.name }} | {{ pin.repo_id or 'bundled' }}{{ '@' + pin.commit[:10] if pin.commit }} | \
{{- pin.sha256[:16] }}… |
{% endfor %}
Pull it with `quiver library pull {{ title }}`.
"""


@dataclass(frozen=True)
class ExpertPin:
    """One expert of a library, pinned by the sha256 of its weights."""

    name: str
    sha256: str
    repo_id: str | None = None  # None: bundled in the library repo under experts/<name>
    commit: str | None = None  # the full commit of repo_id; None for a bundled expert

    def __post_init__(self) -> None:
        check_name(self.name, "expert name")
        if not (isinstance(self.sha256, str) and is_sha256(self.sha256)):
            raise InvalidInputError(
                f"expert {self.name!r}: sha256 {self.sha256!r} is not 64 lowercase hex digits"
            )
        if self.repo_id is not None:
            check_repo_id(self.repo_id)
        pinned = isinstance(self.commit, str) and is_sha(self.commit)
        if (self.repo_id is not None) != pinned or (self.commit is not None and not pinned):
            raise InvalidInputError(
                f"expert {self.name!r}: commit {self.commit!r} does not fit repo_id "
                f"{self.repo_id!r}",
                hint="a referenced expert is pinned by a full commit sha, a bundled one by none",
            )

    @property
    def bundled(self) -> bool:
        return self.repo_id is None

    @property
    def subfolder(self) -> str:
        return f"experts/{self.name}"


@dataclass(frozen=True)
class LibraryManifest:
    """The content of ``library.json``."""

    name: str
    base_model: str
    rank: int | None = None
    target_modules: list[str] | None = None
    description: str = ""
    experts: list[ExpertPin] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> sha256
    build: dict[str, Any] | None = None  # how the library was made (e.g. MBC: method, k, clusters)
    routing: dict[str, dict[str, Any]] | None = None  # how to route it: see Library.set_routing

    def __post_init__(self) -> None:
        names = [pin.name for pin in self.experts]
        problems = (
            (not isinstance(self.name, str), "name must be text"),
            (
                not isinstance(self.base_model, str) or not self.base_model,
                "base_model must be a model id",
            ),
            (self.rank is not None and not _is_rank(self.rank), "rank must be a positive integer"),
            (not _is_names(self.target_modules), "target_modules must be a list of module names"),
            (not isinstance(self.description, str), "description must be text"),
            (
                not all(isinstance(pin, ExpertPin) for pin in self.experts),
                "experts must be ExpertPins",
            ),
            (len(set(names)) != len(names), "two experts share a name"),
            (not isinstance(self.artifacts, dict), "artifacts must map names to sha256"),
            (
                self.build is not None and not isinstance(self.build, dict),
                "build must be a mapping",
            ),
            (not _is_routing(self.routing), "routing must map strategy names to mappings"),
        )
        for wrong, problem in problems:
            if wrong:
                raise InvalidInputError(f"library {self.name}: {problem}")
        for name, sha256 in self.artifacts.items():
            check_name(name, "artifact name")
            if not (isinstance(sha256, str) and is_sha256(sha256)):
                raise InvalidInputError(f"artifact {name!r}: sha256 {sha256!r} is malformed")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if data["routing"] is None:  # left out: Quiver before routing advice reads the rest
            del data["routing"]
        return json.dumps({"format": FORMAT, **data}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str) -> LibraryManifest:
        """Parse and check ``library.json``; anything malformed is a ``CardError``."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("it is not a JSON object")
            if data.pop("format", None) != FORMAT:
                raise ValueError(f"format is not {FORMAT!r}")
            experts = data.pop("experts", None)
            if not (isinstance(experts, list) and all(isinstance(p, dict) for p in experts)):
                raise ValueError("experts is not a list of objects")
            return cls(**data, experts=[ExpertPin(**pin) for pin in experts])
        except (ValueError, TypeError, RecursionError, QuiverError) as error:
            raise CardError(
                f"malformed {MANIFEST} in {source}: {error}",
                hint="restore the manifest from an earlier version (see `versions`)",
            ) from error


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_routing(value: Any) -> bool:
    return value is None or (
        isinstance(value, dict)
        and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items())
    )


def _is_names(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(m, str) for m in value))


def _parse_expert_spec(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return check_repo_id(repo_id), revision or None


class Library:
    """A library at one commit of a registry. Mutating methods commit a new version."""

    def __init__(
        self,
        registry: Registry,
        repo_id: str,
        manifest: LibraryManifest,
        *,
        commit: str,
        folder: Path,
    ) -> None:
        self.registry = registry
        self.repo_id = repo_id
        self.manifest = manifest
        self.commit = commit
        self.folder = folder  # local snapshot: manifest, card and artifacts
        self._experts: dict[str, Expert] = {}

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        registry: Registry,
        repo_id: str,
        *,
        base_model: str,
        description: str = "",
        build: dict[str, Any] | None = None,
        experts: Mapping[str, Expert | str | Path] | None = None,
        artifacts: Mapping[str, str | Path] | None = None,
        bundle: bool = False,
    ) -> Library:
        """Publish a new library for ``base_model`` (``build``: how it was made), empty or with
        ``experts`` (name -> what ``add`` takes) and ``artifacts`` (name -> safetensors file),
        checked first and committed as one version: a failure or an interruption leaves no
        half-built library behind."""
        check_repo_id(repo_id)
        head = registry.head(repo_id)
        if head is not None:
            holds = registry.holding(repo_id, head)
            raise AlreadyExistsError(
                f"{repo_id} already exists in {registry.location}"
                + (f" and holds {HOLDINGS[holds]}" if holds != "library" else ""),
                hint="change it with Library.open(registry, repo_id).add/remove, "
                "or pick another name",
                repo_id=repo_id,
            )
        manifest = LibraryManifest(
            name=repo_id, base_model=base_model, description=description, build=build
        )
        bundled = {}
        for name, expert in (experts or {}).items():
            manifest, copied = _with_expert(registry, manifest, expert, name, bundle=bundle)
            bundled.update({name: copied} if copied is not None else {})
        files = {name: Path(path) for name, path in (artifacts or {}).items()}
        shas = {name: _artifact_sha256(name, path) for name, path in files.items()}
        manifest = dataclasses.replace(manifest, artifacts=shas)
        return _publish(
            registry, repo_id, manifest, bundled, files, message=f"Create library {repo_id}"
        )

    @classmethod
    def open(cls, registry: Registry, repo_id: str, *, revision: str | None = None) -> Library:
        """Fetch a library's manifest, card and artifacts (not its experts) and verify them."""
        manifest, folder, commit = _read_manifest(
            registry, repo_id, revision, patterns=[MANIFEST, CARD, "artifacts/*"]
        )
        library = cls(registry, repo_id, manifest, commit=commit, folder=folder)
        for name, expected in manifest.artifacts.items():
            path = library._artifact_file(name)
            actual = sha256_file(path) if path.is_file() else "missing"
            check_hash(f"{repo_id}: artifact {name!r}", expected=expected, actual=actual)
        return library

    @classmethod
    def pull(
        cls,
        registry: Registry,
        repo_id: str,
        *,
        revision: str | None = None,
        max_workers: int = 16,
    ) -> Library:
        """Open a library and download all its experts concurrently, verifying every hash."""
        library = cls.open(registry, repo_id, revision=revision)
        library.fetch(max_workers=max_workers)
        return library

    def fetch(self, *, max_workers: int = 16) -> dict[str, Expert]:
        """Download (or find in cache) every expert not fetched yet; verify each weight hash."""
        return self._fetch(self.manifest.experts, max_workers=max_workers)

    def _fetch(self, pins: list[ExpertPin], *, max_workers: int = 16) -> dict[str, Expert]:
        missing = [pin for pin in pins if pin.name not in self._experts]
        if missing:
            with (
                ThreadPoolExecutor(max_workers=max_workers) as pool,
                tqdm(
                    total=len(missing), desc=f"Pulling {self.repo_id}", unit="expert", disable=None
                ) as progress,
            ):
                futures = {pool.submit(self._fetch_expert, pin): pin.name for pin in missing}
                for future in as_completed(futures):
                    self._experts[futures[future]] = future.result()
                    progress.update()
        return {pin.name: self._experts[pin.name] for pin in pins}

    def _fetch_expert(self, pin: ExpertPin) -> Expert:
        if pin.bundled:
            root, _ = self.registry.download(
                self.repo_id, revision=self.commit, patterns=[f"{pin.subfolder}/*"]
            )
            if not (root / pin.subfolder).is_dir():
                raise NotFoundError(
                    f"{self.repo_id}@{self.commit[:10]} pins the bundled expert {pin.name!r} "
                    f"but has no {pin.subfolder}/ folder",
                    hint="open an earlier version of the library (see `versions`)",
                )
            return self.registry.open_expert(
                root / pin.subfolder, commit=self.commit, sha256=pin.sha256
            )
        try:
            root, _ = self.registry.download(
                pin.repo_id, revision=pin.commit, patterns=EXPERT_FILES
            )
        except NotFoundError as error:
            raise NotFoundError(
                f"{self.repo_id} pins expert {pin.name!r} at {pin.repo_id}@{pin.commit[:10]}: "
                f"{error.message}",
                hint=f"remove it (quiver library remove {self.repo_id} {pin.name}), push it "
                "there again, or pass a --token that may read it",
                repo_id=pin.repo_id,
                revision=pin.commit,
                expert=pin.name,
            ) from error
        return self.registry.open_expert(
            root, repo_id=pin.repo_id, commit=pin.commit, sha256=pin.sha256
        )

    # -- reading ------------------------------------------------------------------------------
    @property
    def experts(self) -> list[ExpertPin]:
        return list(self.manifest.experts)

    @property
    def names(self) -> list[str]:
        return [pin.name for pin in self.manifest.experts]

    def expert_paths(self) -> dict[str, Path]:
        """Expert name -> local PEFT folder, in manifest order (fetching what is missing)."""
        return {name: expert.path for name, expert in self.fetch().items()}

    def _artifact_file(self, name: str) -> Path:
        return self.folder / "artifacts" / f"{name}.safetensors"

    def artifact_path(self, name: str) -> Path | None:
        """The local .safetensors file of artifact ``name``, or None if the library has none."""
        return self._artifact_file(name) if name in self.manifest.artifacts else None

    def versions(self) -> list[Version]:
        return self.registry.versions(self.repo_id)

    # -- changing (each call commits a new version) ---------------------------------------------
    def add(
        self,
        expert: Expert | str | Path,
        *,
        name: str | None = None,
        bundle: bool = False,
        message: str | None = None,
    ) -> Library:
        """Add an expert: a local folder or unpublished Expert is bundled; a published one (an
        Expert from this registry, or ``"user/repo[@revision]"``) is referenced at its commit,
        unless ``bundle=True`` copies it in."""
        manifest, bundled = _with_expert(self.registry, self.manifest, expert, name, bundle=bundle)
        name = manifest.experts[-1].name
        return self._commit(
            manifest, message or f"Add expert {name}", experts={name: bundled} if bundled else {}
        )

    def remove(self, name: str, *, message: str | None = None) -> Library:
        if name not in self.names:
            raise NotFoundError(
                f"library {self.repo_id} has no expert {name!r}",
                hint=f"its experts are: {', '.join(self.names) or 'none'}",
            )
        experts = [pin for pin in self.manifest.experts if pin.name != name]
        manifest = dataclasses.replace(self.manifest, experts=experts)
        self._experts.pop(name, None)
        return self._commit(manifest, message or f"Remove expert {name}")

    def add_artifact(self, name: str, path: str | Path, *, message: str | None = None) -> Library:
        """Attach (or replace) a routing artifact, a safetensors file such as Arrow prototypes."""
        path = Path(path)
        artifacts = {**self.manifest.artifacts, name: _artifact_sha256(name, path)}
        manifest = dataclasses.replace(self.manifest, artifacts=artifacts)
        return self._commit(manifest, message or f"Add artifact {name}", artifacts={name: path})

    def set_routing(
        self, routing: dict[str, dict[str, Any]] | None, *, message: str | None = None
    ) -> Library:
        """Record how the library is best routed, replacing any earlier advice: strategy name ->
        options, JSON values (e.g. ``{"arrow": {"granularity": "sequence", "prompt_layers":
        [0]}}``; ``{"elrea": {"library": repo_id}}`` names an ELREA library built from the same
        data). Tools such as the app start from it; ``route`` itself never reads it."""
        try:  # stored as JSON reads it back: tuples become lists
            advice = json.loads(json.dumps(routing, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise InvalidInputError(
                f"library {self.repo_id}: routing must hold JSON values ({error})",
                hint="use text, numbers, booleans, lists and mappings",
            ) from error
        manifest = dataclasses.replace(self.manifest, routing=advice)  # checks the shape
        return self._commit(manifest, message or "Set the routing advice")

    def _commit(
        self,
        manifest: LibraryManifest,
        message: str,
        *,
        experts: dict[str, Expert] | None = None,
        artifacts: dict[str, Path] | None = None,
    ) -> Library:
        kept = [pin for pin in self.manifest.experts if pin.bundled and pin in manifest.experts]
        kept_experts = self._fetch(kept)
        kept_artifacts = {n: self._artifact_file(n) for n in manifest.artifacts}
        published = _publish(
            self.registry,
            self.repo_id,
            manifest,
            {**kept_experts, **(experts or {})},
            {**kept_artifacts, **(artifacts or {})},
            message=message,
            parent_commit=self.commit,  # refuse, rather than undo, a change made since
        )
        # Experts fetched before keep their (identical, pinned) files; new ones are fetched anew.
        fetched = {n: e for n, e in self._experts.items() if n in published.names}
        self.__dict__.update(published.__dict__)
        self._experts = fetched
        return self

    def push(
        self,
        registry: Registry,
        repo_id: str | None = None,
        *,
        overwrite: bool = False,
        message: str | None = None,
    ) -> LibraryPush:
        """Publish this library, and the experts it references, to another registry.

        Everything is checked before anything is written: the target repo must be a library (or
        not exist), and an expert repo there whose main holds other weights is refused, naming
        both hashes, unless ``overwrite=True`` moves its main to the library's weights."""
        repo_id = check_repo_id(repo_id or self.repo_id)
        experts = self.fetch()
        head = registry.head(repo_id)
        replaced: tuple[str, ...] = ()
        if head is not None and registry.require_kind(repo_id, head, "library") == "library":
            before, _, _ = _read_manifest(registry, repo_id, head, patterns=[MANIFEST])
            ours = self.manifest.artifacts
            replaced = tuple(n for n, sha in before.artifacts.items() if ours.get(n) != sha)
        referenced = [pin for pin in self.manifest.experts if not pin.bundled]
        found = {pin.name: _find_on(registry, pin) for pin in referenced}
        clashes = {pin.repo_id: found[pin.name][1] for pin in referenced if found[pin.name][1]}
        if clashes and not overwrite:
            raise _clash_error(registry, clashes, self.manifest.experts)
        pins, pushed, already_there = [], [], []
        for pin in self.manifest.experts:
            if not pin.bundled:
                commit = found[pin.name][0]
                if commit is None:
                    commit = registry.push(experts[pin.name], pin.repo_id).commit
                    pushed.append(pin.repo_id)
                else:
                    already_there.append(pin.repo_id)
                pin = dataclasses.replace(pin, commit=commit)
            pins.append(pin)
        manifest = dataclasses.replace(self.manifest, name=repo_id, experts=pins)
        bundled = {pin.name: experts[pin.name] for pin in pins if pin.bundled}
        artifacts = {name: self._artifact_file(name) for name in manifest.artifacts}
        library = _publish(
            registry,
            repo_id,
            manifest,
            bundled,
            artifacts,
            message=message or "Push library",
            parent_commit=head,
        )
        return LibraryPush(library, tuple(pushed), tuple(already_there), clashes, replaced)

    def __repr__(self) -> str:
        return f"Library({self.repo_id!r}@{self.commit[:10]}, experts={self.names})"


def _with_expert(
    registry: Registry,
    manifest: LibraryManifest,
    expert: Expert | str | Path,
    name: str | None,
    *,
    bundle: bool,
) -> tuple[LibraryManifest, Expert | None]:
    """``manifest`` with ``expert`` pinned as ``name``, after every check ``Library.add`` makes;
    and the expert when it is to be bundled (copied into the library repo)."""
    if isinstance(expert, str) and not Path(expert).is_dir():
        repo_id, revision = _parse_expert_spec(expert)
        expert = registry.pull(repo_id, revision=revision)
    elif not isinstance(expert, Expert):
        expert = Expert.from_folder(expert)
    elif expert.repo_id and expert.commit and not bundle:
        _require_in(registry, expert, manifest.name)
    name = check_name(name or expert.name, "expert name")
    if name in [pin.name for pin in manifest.experts]:
        raise AlreadyExistsError(
            f"library {manifest.name} already has an expert named {name!r}",
            hint="remove it first, or pass another name",
            repo_id=manifest.name,
            expert=name,
        )
    expert.check_finite()
    expert.check_fits(
        base_model=manifest.base_model,
        rank=manifest.rank if manifest.rank is not None else expert.card.rank,
        target_modules=manifest.target_modules or expert.card.target_modules,
    )
    bundled = bundle or expert.repo_id is None or expert.commit is None
    pin = ExpertPin(
        name=name,
        sha256=expert.weights_sha256,
        repo_id=None if bundled else expert.repo_id,
        commit=None if bundled else expert.commit,
    )
    manifest = dataclasses.replace(
        manifest,
        rank=expert.card.rank,
        target_modules=expert.card.target_modules,
        experts=[*manifest.experts, pin],
    )
    return manifest, expert if bundled else None


def _require_in(registry: Registry, expert: Expert, library_id: str) -> None:
    """A referenced expert lives in the library's registry, at its commit."""
    try:
        registry.files(expert.repo_id, revision=expert.commit)
    except NotFoundError as error:
        raise NotFoundError(
            f"{expert.repo_id}@{expert.commit[:10]} is not in {registry.location}, "
            f"where {library_id} lives",
            hint="push the expert there first, or bundle it (bundle=True, --bundle)",
            repo_id=expert.repo_id,
            revision=expert.commit,
        ) from error


def _artifact_sha256(name: str, path: Path) -> str:
    """The sha256 of a routing artifact, once its name and file are checked."""
    check_name(name, "artifact name")
    try:
        if not path.is_file():  # a FIFO or a device would block the reads below
            raise OSError(f"{path} is not a regular file")
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise InvalidInputError(
            f"artifact {path} is not a readable safetensors file ({error})",
            hint="save routing artifacts with safetensors.torch.save_file",
        ) from error
    return sha256_file(path)


@dataclass(frozen=True)
class LibraryPush:
    """What ``Library.push`` did."""

    library: Library  # the library as published on the target
    pushed: tuple[str, ...]  # expert repos this push committed to
    already_there: tuple[str, ...]  # expert repos that held the pinned weights already
    overwritten: dict[str, str]  # expert repo -> sha256 of the weights its main held before
    replaced_artifacts: tuple[str, ...]  # the target library's artifacts this version changed


def _read_manifest(
    registry: Registry, repo_id: str, revision: str | None, *, patterns: list[str]
) -> tuple[LibraryManifest, Path, str]:
    check_repo_id(repo_id)
    folder, commit = registry.download(repo_id, revision=revision, patterns=patterns)
    if not (folder / MANIFEST).is_file():
        raise NotFoundError(
            f"{repo_id}@{commit[:10]} has no {MANIFEST}: it is not a Quiver library",
            hint="pull experts with `quiver pull`, or create the library first",
            repo_id=repo_id,
            revision=revision,
        )
    text = (folder / MANIFEST).read_bytes()
    return LibraryManifest.from_json(text, source=f"{repo_id}@{commit[:10]}"), folder, commit


def _find_on(registry: Registry, pin: ExpertPin) -> tuple[str | None, str | None]:
    """Where ``pin``'s weights already are in ``registry``: the commit holding them (the pinned
    one, or main's) or None; and, when main holds another expert, the sha256 of its weights."""
    head = registry.head(pin.repo_id)
    if head is None or registry.require_kind(pin.repo_id, head, "expert") == "empty":
        return None, None
    for revision in (pin.commit, head):
        try:
            expert = registry.pull(pin.repo_id, revision=revision)
        except NotFoundError:
            continue  # the pinned commit is another registry's
        if expert.weights_sha256 == pin.sha256:
            return expert.commit, None
    return None, expert.weights_sha256


def _clash_error(
    registry: Registry, clashes: dict[str, str], pins: list[ExpertPin]
) -> ConflictError:
    ours = {pin.repo_id: pin.sha256 for pin in pins}
    each = "; ".join(
        f"{repo} holds sha256 {theirs[:16]}…, the library pins {ours[repo][:16]}…"
        for repo, theirs in clashes.items()
    )
    return ConflictError(
        f"expert repos in {registry.location} already hold other weights: {each}",
        hint="pass overwrite=True (quiver library push --overwrite) to move their main to the "
        "library's weights",
        repo_id=next(iter(clashes)),
    )


def _library_card(repo_id: str, manifest: LibraryManifest) -> ModelCard:
    data = ModelCardData(
        base_model=manifest.base_model,
        tags=[QUIVER_TAG, LIBRARY_TAG, base_model_tag(manifest.base_model)],
        quiver={
            "library": {
                "experts": [pin.name for pin in manifest.experts],
                **({"build": manifest.build} if manifest.build else {}),
                **({"routing": manifest.routing} if manifest.routing else {}),
            }
        },
    )
    return ModelCard.from_template(
        data,
        template_str=_LIBRARY_TEMPLATE,
        title=repo_id,
        description=manifest.description,
        experts=manifest.experts,
    )


def _publish(
    registry: Registry,
    repo_id: str,
    manifest: LibraryManifest,
    experts: dict[str, Expert],
    artifacts: dict[str, Path],
    *,
    message: str,
    parent_commit: str | None = None,
) -> Library:
    """Stage the library's full snapshot in a temporary folder and commit it as one version."""
    with (
        writing(f"publish library {repo_id}", repo_id),
        tempfile.TemporaryDirectory(prefix="quiver-library-") as staging_dir,
    ):
        staging = Path(staging_dir)
        for pin in manifest.experts:
            if pin.bundled:
                expert = experts[pin.name]
                member = dataclasses.replace(expert.card, library=repo_id)
                dataclasses.replace(expert, card=member).save(
                    staging / pin.subfolder, title=f"{repo_id}/{pin.subfolder}", link=True
                )
        for name, path in artifacts.items():
            (staging / "artifacts").mkdir(exist_ok=True)
            (staging / "artifacts" / f"{name}.safetensors").symlink_to(Path(path).resolve())
        (staging / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
        _library_card(repo_id, manifest).save(staging / CARD)
        commit = registry.upload(
            repo_id,
            staging,
            message=message,
            parent_commit=parent_commit,
            new_repo=parent_commit is None,  # every caller passes the head it saw
        )
    return Library.open(registry, repo_id, revision=commit)
