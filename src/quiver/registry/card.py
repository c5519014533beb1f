"""Model cards for experts and libraries: the Hub's conventions plus a ``quiver:`` section.

The YAML front matter is what the Hub indexes (base_model, library_name, tags with
``base_model:adapter:<id>``, datasets, license, model-index), so an expert pushed by Quiver is
found by the Hub's own filters. The ``quiver:`` section carries what the Hub has no field for: the
tasks an expert was trained on, a training summary, its library and the content hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from quiver.errors import CardError
from quiver.store import parse_front_matter

QUIVER_TAG = "quiver"
EXPERT_TAG = "lora"
LIBRARY_TAG = "quiver-library"
TASK_TAG_PREFIX = "task:"
ADAPTER_TAG_PREFIX = "base_model:adapter:"

_EXPERT_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

A LoRA expert for [{{ base_model }}](https://huggingface.co/{{ base_model }}) (rank {{ rank }},
alpha {{ alpha }}, target modules: {{ target_modules | join(', ') }}).
{% if tasks %}Trained on: {{ tasks | join(', ') }}.{% endif %}

Load it with PEFT:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{{ title }}")
```
"""


def base_model_tag(base_model: str) -> str:
    return f"{ADAPTER_TAG_PREFIX}{base_model}"


def task_tag(task: str) -> str:
    return f"{TASK_TAG_PREFIX}{task}"


def parse_card(text: str) -> ModelCard:
    """Parse README.md text into a ModelCard, raising ``CardError`` on malformed YAML (the
    store's rule first: one mapping, no aliases)."""
    try:
        metadata = parse_front_matter(text) or {}
        card = None if _metadata_problem(metadata) else ModelCard(text)
    except (yaml.YAMLError, ValueError, TypeError) as error:
        raise CardError(
            f"malformed model card YAML: {' '.join(str(error).split())}",
            hint="fix the front matter between the '---' lines of README.md",
        ) from error
    if card is None:
        raise CardError(
            f"malformed model card: {_metadata_problem(metadata)}",
            hint="fix the front matter between the '---' lines of README.md",
        )
    return card


def _metadata_problem(metadata: dict[str, Any]) -> str | None:
    """What makes the Hub fields of a card's metadata unusable, if anything."""
    for name in ("base_model", "tags", "datasets", "license"):
        value = metadata.get(name)
        if value is not None and not _is_texts(_as_list(value)):
            return f"{name} must be a string or a list of strings"
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise CardError(
            f"malformed quiver section in the model card: {what}",
            hint="fix the 'quiver:' block of README.md or delete it to have it rebuilt",
        )


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_section(section: dict[str, Any], training: dict[str, Any]) -> None:
    """Every field of the quiver section that is set has the type the card gives it."""
    fields = (
        ("tasks", section, _is_texts, "a list of strings"),
        ("library", section, _is_text, "a repo id"),
        ("description", section, _is_text, "text"),
        ("training.examples", training, _is_count, "a whole number"),
        ("training.steps", training, _is_count, "a whole number"),
        ("training.epochs", training, _is_number, "a number"),
        ("training.train_loss", training, _is_number, "a number"),
        ("training.hyperparameters", training, lambda v: isinstance(v, dict), "a mapping"),
        ("training.merged_from", training, _is_texts, "a list of repo ids"),
    )
    for name, where, valid, kind in fields:
        value = where.get(name.rpartition(".")[2])
        _require(value is None or valid(value), f"'quiver.{name}' must be {kind}")


@dataclass
class ExpertCard:
    """What an expert's README.md says about it. Rank, alpha and targets mirror adapter_config."""

    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    tasks: list[str] = field(default_factory=list)
    examples: int | None = None
    steps: int | None = None
    epochs: float | None = None
    train_loss: float | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    merged_from: list[str] = field(default_factory=list)  # a merge of these experts, not trained
    library: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    eval_results: list[EvalResult] = field(default_factory=list)
    description: str = ""

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> ExpertCard:
        """The card of an adapter that came without one: everything adapter_config.json knows."""
        targets = config.get("target_modules") or []
        return cls(
            base_model=config.get("base_model_name_or_path") or "unknown",
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=sorted(_as_list(targets)),
        )

    @classmethod
    def from_text(cls, text: str | None, config: dict[str, Any]) -> ExpertCard:
        """Read a README.md (quiver's, PEFT's, or a human's) and complete it from the config."""
        card = cls.from_adapter_config(config)
        if text is None:
            return card
        model_card = parse_card(text)
        data = model_card.data
        section = data.to_dict().get(QUIVER_TAG) or {}
        _require(isinstance(section, dict), "'quiver' must be a mapping")
        training = section.get("training") or {}
        _require(isinstance(training, dict), "'quiver.training' must be a mapping")
        hashes = section.get("hashes") or {}
        _require(
            isinstance(hashes, dict) and all(isinstance(v, str) for v in hashes.values()),
            "'quiver.hashes' must map file names to sha256 hex digests",
        )
        _check_section(section, training)
        tasks = section.get("tasks") or []
        if isinstance(data.base_model, str) and card.base_model == "unknown":
            card.base_model = data.base_model
        derived = {QUIVER_TAG, EXPERT_TAG, "peft", base_model_tag(card.base_model)}
        derived |= {task_tag(task) for task in tasks}
        card.tasks = list(tasks)
        card.examples = training.get("examples")
        card.steps = training.get("steps")
        card.epochs = training.get("epochs")
        card.train_loss = training.get("train_loss")
        card.hyperparameters = dict(training.get("hyperparameters") or {})
        card.merged_from = list(training.get("merged_from") or [])
        card.library = section.get("library")
        card.hashes = dict(hashes)
        card.datasets = _as_list(data.datasets)
        card.license = data.license
        card.tags = [tag for tag in _as_list(data.tags) if tag not in derived]
        card.eval_results = list(data.eval_results or [])
        card.description = section.get("description") or ""
        return card

    @property
    def all_tags(self) -> list[str]:
        """Hub tags: the usual adapter tags, one ``task:<name>`` per task, then the user's."""
        tags = [QUIVER_TAG, EXPERT_TAG, "peft", base_model_tag(self.base_model)]
        tags += [task_tag(task) for task in self.tasks] + self.tags
        return list(dict.fromkeys(tags))

    def to_model_card(self, title: str) -> ModelCard:
        training = {
            "examples": self.examples,
            "steps": self.steps,
            "epochs": self.epochs,
            "train_loss": self.train_loss,
            "hyperparameters": self.hyperparameters or None,
            "merged_from": self.merged_from or None,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
        }
        section = {
            "tasks": self.tasks,
            "training": {k: v for k, v in training.items() if v is not None},
            "library": self.library,
            "description": self.description or None,
            "hashes": self.hashes,
        }
        data = ModelCardData(
            base_model=self.base_model,
            library_name="peft",
            pipeline_tag="text-generation",
            license=self.license,
            datasets=self.datasets or None,
            tags=self.all_tags,
            model_name=title if self.eval_results else None,
            eval_results=self.eval_results or None,
            quiver={k: v for k, v in section.items() if v not in (None, [], {})},
        )
        return ModelCard.from_template(
            data,
            template_str=_EXPERT_TEMPLATE,
            title=title,
            description=self.description,
            rank=self.rank,
            alpha=self.alpha,
            target_modules=self.target_modules,
            tasks=self.tasks,
        )
