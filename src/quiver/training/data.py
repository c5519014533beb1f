"""Training data: prompt/response pairs or chat conversations, from files, datasets or iterables.

Every example keeps where it came from (``file.jsonl:12``, ``example 3``), so an error about it
names the line to fix. Tokenised examples carry labels of -100 on the prompt, so the loss is taken
on the response tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quiver.errors import TrainingError

IGNORE_INDEX = -100
_PAIR_KEYS = (("prompt", "response"), ("prompt", "completion"))

# A file (JSONL, or a folder written by ``datasets.Dataset.save_to_disk``), a ``datasets.Dataset``,
# or any iterable of ``(prompt, response)`` pairs or ``{"prompt", "response"}``/``{"messages"}``
# dicts.
DataSource = str | Path | Iterable[Any]


@dataclass(frozen=True)
class Example:
    """One training example: a prompt and its response, or a chat conversation."""

    source: str
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


def _example(record: Any, source: str) -> Example:
    if isinstance(record, Mapping):
        if "messages" in record:
            messages = record["messages"]
            ok = (
                isinstance(messages, Sequence)
                and not isinstance(messages, str)
                and all(
                    isinstance(m, Mapping)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                )
            )
            if not ok or not any(m["role"] == "assistant" for m in messages):
                raise TrainingError(
                    f"{source}: 'messages' must be a list of {{role, content}} dicts with at "
                    "least one assistant message"
                )
            return Example(source, messages=tuple(dict(m) for m in messages))
        for prompt_key, response_key in _PAIR_KEYS:
            if prompt_key in record and response_key in record:
                record = (record[prompt_key], record[response_key])
                break
        else:
            raise TrainingError(
                f"{source}: an example needs 'prompt' and 'response' (or 'completion') fields, "
                f"or 'messages'; found {sorted(record)}"
            )
    if (
        isinstance(record, Sequence)
        and not isinstance(record, str)
        and len(record) == 2
        and all(isinstance(text, str) for text in record)
    ):
        if not record[1]:
            raise TrainingError(f"{source}: the response is empty", hint="nothing to learn from")
        return Example(source, prompt=record[0], response=record[1])
    raise TrainingError(
        f"{source}: expected a (prompt, response) pair of strings or a dict, "
        f"got {type(record).__name__}"
    )


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:  # line by line, so that an error names its line; a leading BOM is dropped
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except UnicodeDecodeError as error:
                raise TrainingError(
                    f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})",
                    hint="save the file as UTF-8",
                ) from error
            except json.JSONDecodeError as error:
                raise TrainingError(
                    f"{path}:{number}: not valid JSON ({error.msg})",
                    hint="write one JSON object per line",
                ) from error
            examples.append(_example(record, f"{path}:{number}"))
    return examples


def _read_path(path: Path) -> tuple[str, list[Example]]:
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as error:
            raise TrainingError(
                f"{path} is a folder; reading saved datasets needs the `datasets` package",
                hint="pip install 'lora-quiver[datasets]'",
            ) from error
        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError as error:
            raise TrainingError(
                f"{path} is neither a JSONL file nor a saved `datasets` Dataset ({error})"
            ) from error
        return _read_iterable(dataset, str(path))
    if not path.is_file():
        raise TrainingError(f"no training data at {path}", hint="pass a JSONL file")
    return str(path), _read_jsonl(path)


def _read_iterable(records: Iterable[Any], label: str) -> tuple[str, list[Example]]:
    if hasattr(records, "keys") and not isinstance(records, Mapping):  # a DatasetDict
        raise TrainingError(
            f"{label} holds several splits ({', '.join(records.keys())})",
            hint="pass one split, e.g. dataset['train']",
        )
    examples = [_example(record, f"{label}, example {i}") for i, record in enumerate(records)]
    return label, examples


def load_examples(data: DataSource) -> list[Example]:
    """Read and check every example of ``data``; raise ``TrainingError`` if there are none."""
    if isinstance(data, (str, Path)):
        label, examples = _read_path(Path(data))
    elif isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise TrainingError(
            f"a {type(data).__name__} is not a data source",
            hint="pass a JSONL file, a dataset or a list of (prompt, response) pairs",
        )
    else:
        label, examples = _read_iterable(data, "data")
    if not examples:
        raise TrainingError(f"{label} holds no examples", hint="every task needs training data")
    return examples


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _encode_pair(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    prompt = _encode(tokenizer, example.prompt, special=True)
    response = _encode(tokenizer, example.response, special=False)
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def _encode_chat(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    """Render the conversation with the chat template; the loss covers the assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingError(
            f"{example.source}: a chat example, but the tokenizer has no chat template",
            hint="set tokenizer.chat_template, or give prompt/response pairs",
        )
    messages = list(example.messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        end = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(start) and text.startswith(end)):
            raise TrainingError(
                f"{example.source}: the chat template does not render conversations "
                "prefix by prefix, so the assistant's tokens cannot be located"
            )
        spans.append((len(start), len(end)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(lo <= begin < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def tokenize_examples(
    examples: Sequence[Example], tokenizer, *, max_length: int
) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` per example; refuse any example longer than ``max_length``."""
    features = []
    for example in examples:
        encode = _encode_chat if example.messages is not None else _encode_pair
        ids, labels = encode(example, tokenizer)
        if len(ids) > max_length:
            raise TrainingError(
                f"{example.source}: {len(ids)} tokens, longer than the model's context "
                f"({max_length} tokens)",
                hint="shorten the example or raise TrainConfig.max_length within the context",
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise TrainingError(f"{example.source}: no response tokens to learn from")
        features.append({"input_ids": ids, "labels": labels})
    return features


def collate(features: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
    return {key: torch.tensor(value) for key, value in batch.items()}
