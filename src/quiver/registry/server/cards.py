"""Model-card metadata as the Hub derives it: the README's YAML front matter becomes ``cardData``,
and a few of its fields become the tags that ``list_models(filter=...)`` matches."""

from __future__ import annotations

import re
from typing import Any

import yaml

_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def parse_front_matter(text: str) -> dict[str, Any] | None:
    """The README's YAML header as a dict; None when there is none. Raises ``yaml.YAMLError`` or
    ``ValueError`` when the header is not a YAML mapping."""
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("the YAML header of README.md must be a mapping")
    return data


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


def card_tags(card: dict[str, Any] | None) -> list[str]:
    """Tags in the Hub's spelling: the card's own tags, the library, ``license:x``, ``dataset:x``,
    ``base_model:x`` and, for adapters (library peft), ``base_model:adapter:x``."""
    if not card:
        return []
    tags = _as_list(card.get("tags"))
    libraries = _as_list(card.get("library_name"))
    tags += libraries
    tags += [f"license:{value}" for value in _as_list(card.get("license"))]
    tags += [f"dataset:{value}" for value in _as_list(card.get("datasets"))]
    for base in _as_list(card.get("base_model")):
        tags.append(f"base_model:{base}")
        if "peft" in libraries:
            tags.append(f"base_model:adapter:{base}")
    if card.get("pipeline_tag"):
        tags.append(str(card["pipeline_tag"]))
    return list(dict.fromkeys(tags))
