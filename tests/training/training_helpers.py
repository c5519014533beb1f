"""Tiny tasks for the training tests: each maps a word to a different answer."""

import json

from quiver.training import TrainConfig

WORDS = ["abc", "hello", "world", "quiver", "lora", "train", "model", "expert", "arrow", "mbc"]
TASKS = {
    "upper": lambda word: word.upper(),
    "reverse": lambda word: word[::-1],
    "double": lambda word: word + word,
}
# Enough to move a random 2-layer model's loss on a task in about a second.
FAST = TrainConfig(rank=4, dropout=0.0, learning_rate=1e-2, max_steps=12, batch_size=8)


def pairs(task: str, words=WORDS) -> list[tuple[str, str]]:
    return [(f"{task} {word}:", TASKS[task](word)) for word in words]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)
