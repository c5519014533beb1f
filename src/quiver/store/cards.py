"""Model-card metadata as the Hub derives it: the README's YAML front matter becomes ``cardData``,
and a few of its fields become the tags that search filters match."""

from __future__ import annotations

import re
from typing import Any

import yaml

_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


class _CardLoader(yaml.SafeLoader):
    """Safe YAML without aliases (``*name``): a card has no use for them, and a few lines of them
    expand into gigabytes once the card is copied or serialised (the "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed", problem_mark=mark)
        return super().compose_node(parent, index)


def parse_front_matter(text: str) -> dict[str, Any] | None:
    """The README's YAML header as a dict; None when there is none. Raises ``ValueError``, with
    one line saying what is wrong and where, when the header is not a YAML mapping."""
    match = _FRONT_MATTER.match(text)
    if match is None:
        return None
    try:
        data = yaml.load(match.group(1), Loader=_CardLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = text[: match.start(1)].count("\n") + mark.line + 1 if mark else None
        where = f", at README.md line {line}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{error.problem}{where}") from None
    except RecursionError:
        raise ValueError("the YAML is nested too deeply") from None
    except yaml.YAMLError as error:
        raise ValueError(str(error)) from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("the YAML header of README.md must be a mapping")
    return data


def read_card(text: str) -> tuple[dict[str, Any] | None, str]:
    """The README's metadata (None when absent or malformed) and its text after the header."""
    match = _FRONT_MATTER.match(text)
    body = text[match.end() :] if match else text
    try:
        return parse_front_matter(text), body
    except ValueError:
        return None, body


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


def search_text(repo_id: str, card: dict[str, Any] | None, body: str) -> str:
    """What free-text search matches: the repo id and the description (of a Quiver card's
    ``quiver:`` section, else the README's text)."""
    section = (card or {}).get("quiver")
    described = section.get("description") if isinstance(section, dict) else body
    return f"{repo_id}\n{described or ''}"
