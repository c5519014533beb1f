"""An expert: a plain PEFT LoRA folder (adapter_config.json, adapter_model.safetensors, README.md).

``Expert.from_folder`` is the one gate every expert passes, whether it comes from a user's disk, the
local store or the Hub: LoRA only, safetensors only, a config that describes its tensors (the one
check of ``adapter.py``, which routing uses too), weights that match the hashes the card pins.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from quiver.errors import (
    CardError,
    IncompatibleExpertError,
    IntegrityError,
    InvalidAdapterError,
    NotFoundError,
)
from quiver.fs import sha256_file
from quiver.registry.adapter import (
    ADAPTER_CONFIG,
    WEIGHTS,
    check_finite,
    lora_modules,
    read_adapter_config,
)
from quiver.registry.card import ExpertCard

CARD = "README.md"
EXPERT_FILES = (ADAPTER_CONFIG, WEIGHTS, CARD)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_hash(what: str, *, expected: str, actual: str) -> None:
    """Raise ``IntegrityError`` naming ``what`` unless the two sha256 digests agree."""
    if actual != expected:
        raise IntegrityError(
            f"{what} does not match its pinned sha256 (expected {expected[:12]}…, got "
            f"{actual[:12]}…)",
            hint="the file was tampered with or truncated: pull it again from a trusted registry",
        )


def read_card(folder: str | Path, *, label: str | None = None) -> ExpertCard:
    """An expert folder's card, completed from its ``adapter_config.json``, without reading the
    weights (a preview of a repo before its pull); a broken card or config is a typed error naming
    ``label`` (the folder by default)."""
    folder = Path(folder)
    label = label or str(folder)
    return _read_card(folder, read_adapter_config(folder, label), label)


def _read_card(folder: Path, config: dict[str, Any], label: str) -> ExpertCard:
    """The folder's card, completed from its config; a broken one is refused, naming the folder."""
    path = folder / CARD
    try:
        return ExpertCard.from_text(path.read_text("utf-8") if path.is_file() else None, config)
    except UnicodeDecodeError:
        raise CardError(
            f"{label}: {CARD} is not UTF-8 text", hint=f"re-save {CARD} as UTF-8, or delete it"
        ) from None
    except CardError as error:
        raise CardError(f"{label}: {error.message}", hint=error.hint) from error


@dataclass
class Expert:
    """A validated LoRA expert on local disk, with its card and, once published, where it lives."""

    path: Path
    config: dict[str, Any]
    card: ExpertCard
    repo_id: str | None = None
    commit: str | None = None

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        *,
        repo_id: str | None = None,
        commit: str | None = None,
        **card_fields: Any,
    ) -> Expert:
        """Validate a PEFT LoRA folder; ``card_fields`` (tasks=, examples=, ...) update its card."""
        path = Path(path)
        label = f"{repo_id}@{commit[:10]}" if repo_id and commit else str(path)
        if repo_id is None and not path.is_dir():
            raise NotFoundError(f"no expert folder at {path}")
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InvalidAdapterError(
                f"{label} contains pickle files ({', '.join(pickles)})",
                hint="Quiver never unpickles: keep only adapter_model.safetensors",
            )
        config = read_adapter_config(path, label)
        card = _read_card(path, config, label)
        unknown = set(card_fields) - {f.name for f in dataclasses.fields(ExpertCard)}
        if unknown:
            raise TypeError(f"unknown card fields: {', '.join(sorted(unknown))}")
        card = dataclasses.replace(card, **card_fields)
        expert = cls(path=path, config=config, card=card, repo_id=repo_id, commit=commit)
        expert.verify()  # a pinned hash first: tampering is an IntegrityError, whatever it broke
        lora_modules(path, config, label)
        return expert

    @property
    def name(self) -> str:
        return (self.repo_id or self.path.name).rsplit("/", 1)[-1]

    @property
    def base_model(self) -> str:
        return self.card.base_model

    @cached_property
    def weights_sha256(self) -> str:
        return sha256_file(self.path / WEIGHTS)

    def file_hashes(self) -> dict[str, str]:
        return {
            ADAPTER_CONFIG: sha256_file(self.path / ADAPTER_CONFIG),
            WEIGHTS: self.weights_sha256,
        }

    def verify(self) -> None:
        """Raise ``IntegrityError`` if a file no longer matches the hash its card pins."""
        for name, expected in self.card.hashes.items():
            path = self.path / name
            if not path.is_file():
                actual = "missing"
            else:
                actual = self.weights_sha256 if name == WEIGHTS else sha256_file(path)
            check_hash(f"{self.repo_id or self.path}: {name}", expected=expected, actual=actual)

    def check_finite(self) -> None:
        """Refuse NaN or infinite weights (streams the tensors: run before publishing)."""
        check_finite(self.path, str(self.repo_id or self.path))

    def check_fits(self, *, base_model: str, rank: int, target_modules: list[str]) -> None:
        """Raise ``IncompatibleExpertError`` unless this expert shares the given LoRA geometry."""
        mine = (self.card.base_model, self.card.rank, self.card.target_modules)
        theirs = (base_model, rank, sorted(target_modules))
        for what, have, want in zip(
            ("base model", "rank", "target modules"), mine, theirs, strict=True
        ):
            if have != want:
                raise IncompatibleExpertError(
                    f"expert {self.name!r} has {what} {have!r}, the library needs {want!r}",
                    hint="a library's experts share one base model, rank and target modules",
                )

    def save(self, folder: str | Path, *, title: str | None = None, link: bool = False) -> Path:
        """Write the expert's files and a fresh card (with current hashes) into ``folder``.
        ``link=True`` symlinks the config and weights instead of copying them: staging a push
        then writes only the card, not a second copy of a multi-GB expert."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve() != self.path.resolve():  # saving in place only rewrites the card
            for name in (ADAPTER_CONFIG, WEIGHTS):
                if link:
                    (folder / name).symlink_to((self.path / name).resolve())
                else:
                    shutil.copyfile(self.path / name, folder / name)
        card = dataclasses.replace(self.card, hashes=self.file_hashes())
        card.to_model_card(title or self.repo_id or self.name).save(folder / CARD)
        return folder
