"""The toy world's tasks: short instructions over four input domains, seeded and public.

Each domain (numbers, capital pairs, symbol pairs, short words; ``TABLE_SIZE`` of each) has one
mapping, a seeded random permutation of its symbols: a lookup table with no rule behind it, so
each cluster's knowledge is the table itself. A domain's tasks differ only in the output format:
map each element, the first, the last, or both ends. This is "World B" of the feasibility notes
(tasks that map the same inputs differently could not be told apart by input-side prototypes,
while one mapping per domain gives clusters routing can find from the inputs), with tables long
enough that one low-rank adapter cannot hold all four as well as one expert holds its own: the
capacity limit that motivates a library of experts.

A prompt reads ``"<verb> <format> : <inputs>"`` (``"map each : 3 1 4"``) and its answer is the
mapped elements in that format. Held-out tasks are new instructions over one
domain's inputs, never trained on by any expert: paraphrases (the verb ``convert`` and a synonym
of the format word, both of which the base model knows from pretraining) and a new format
(``reverse``).

A ``Task`` is a small public object: anyone can make new ones and evaluate any model on them with
``quiver.toyworld.evaluate``.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from quiver.errors import InvalidInputError

SPLITS = ("train", "eval")
KINDS = ("train", "paraphrase", "new format", "composition")
MIN_LENGTH, MAX_LENGTH = 3, 6  # elements per input


@dataclass(frozen=True)
class Domain:
    """An input vocabulary and the one mapping its tasks apply: ``symbols[i] -> outputs[i]``."""

    name: str
    symbols: tuple[str, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.symbols) != len(self.outputs) or len(set(self.symbols)) != len(self.symbols):
            raise InvalidInputError(
                f"domain {self.name!r} needs distinct symbols and one output per symbol"
            )

    def map(self, symbol: str) -> str:
        return self.outputs[self.symbols.index(symbol)]

    def sample(self, rng: random.Random) -> list[str]:
        """A random input: MIN_LENGTH to MAX_LENGTH distinct symbols of this domain."""
        return distinct(rng, self.symbols)


def distinct(rng: random.Random, words: Sequence[str]) -> list[str]:
    """MIN_LENGTH to MAX_LENGTH distinct words in random order. Without repeats, every element of
    an answer points at one place in the input, which lets a small model learn to copy quickly."""
    return rng.sample(list(words), rng.randint(MIN_LENGTH, MAX_LENGTH))


TABLE_SIZE = 48  # symbols per input domain: each cluster's knowledge is a table this long


def _permutation(symbols: Sequence[str], seed: str) -> tuple[str, ...]:
    """A seeded random permutation of ``symbols``: a lookup table with no rule to learn it by."""
    outputs = list(symbols)
    random.Random(seed).shuffle(outputs)
    return tuple(outputs)


def _domain(name: str, symbols: Sequence[str]) -> Domain:
    return Domain(name, tuple(symbols), _permutation(symbols, f"toyworld/{name}"))


_LETTER_PAIRS = [a + b for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for b in "AEIOU"]
_SYMBOL_PAIRS = [a + b for a in "!?@#$%&*+=~^" for b in "!?@#$%&*+=~^"]
_WORDS = [c + v + e for c in "bdfgklmnprstvz" for v in "aeiou" for e in "nrs"]
DOMAINS: dict[str, Domain] = {
    domain.name: domain
    for domain in (
        _domain("numbers", [str(i) for i in range(TABLE_SIZE)]),
        _domain("letters", _LETTER_PAIRS[:TABLE_SIZE]),
        _domain("symbols", _SYMBOL_PAIRS[:TABLE_SIZE]),
        _domain("words", _WORDS[:TABLE_SIZE]),
    )
}


# Output formats: which elements an answer holds, in order. Each has the words that name it: the
# first is what the trained tasks use, the others are synonyms the base model learns in pretraining.
FORMATS: dict[str, Callable[[Sequence[str]], list[str]]] = {
    "each": lambda xs: list(xs),
    "first": lambda xs: [xs[0]],
    "last": lambda xs: [xs[-1]],
    "ends": lambda xs: [xs[0], xs[-1]],
    "reverse": lambda xs: list(reversed(xs)),
}
FORMAT_WORDS: dict[str, tuple[str, ...]] = {
    "each": ("each", "every", "all"),
    "first": ("first", "initial"),
    "last": ("last", "final"),
    "ends": ("ends", "both"),
    "reverse": ("reverse", "backwards"),
}
COPY_VERBS = ("copy", "repeat")  # pretraining: the format applied to the inputs themselves
MAPPING_VERBS = ("map", "convert")  # the tasks' verbs; pretraining gives them random answers
TRAINED_FORMATS = ("each", "first", "last", "ends")


@dataclass(frozen=True)
class Example:
    """One prompt (the user's message) and its answer, both space-separated words."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A named instruction over one cluster's inputs; ``generate(rng)`` gives (inputs, answer).

    ``kind`` says what a result on it shows: ``train`` (experts learn it), ``paraphrase`` and
    ``new format`` (held out: new instructions over a trained cluster's inputs), ``composition``
    (listed for curiosity; no method solves those at this scale, so they are no evidence).
    """

    name: str
    cluster: str
    instruction: str
    generate: Callable[[random.Random], tuple[Sequence[str], Sequence[str]]]
    kind: str = "train"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(
                f"task {self.name!r} has unknown kind {self.kind!r}", hint=f"use one of {KINDS}"
            )

    @property
    def held_out(self) -> bool:
        return self.kind != "train"

    def examples(self, n: int, *, split: str = "train", seed: int = 0) -> list[Example]:
        """``n`` examples of ``split``; the same for the same seed, on any machine.

        Inputs are assigned to a split by a hash of their text (one in five to ``eval``), so the
        two splits never share an input however many examples are drawn.
        """
        if split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}", hint=f"use one of {SPLITS}")
        rng = random.Random(f"{seed}/{self.name}/{split}")
        found: list[Example] = []
        for _ in range(1000 * max(n, 1)):
            if len(found) == n:
                return found
            inputs, answer = self.generate(rng)
            text = " ".join(inputs)
            if (zlib.crc32(text.encode()) % 5 == 0) == (split == "eval"):
                found.append(Example(f"{self.instruction} : {text}", " ".join(answer)))
        raise InvalidInputError(
            f"task {self.name!r} cannot give {n} examples of its {split!r} split",
            hint="its generator repeats too few inputs; widen its input space",
        )


def mapping_task(
    domain: Domain, fmt: str, *, verb: str = "map", word: str | None = None, kind: str = "train"
) -> Task:
    """The task "<verb> <word> : <inputs of domain>": map every element, answer in ``fmt``."""

    def generate(rng: random.Random) -> tuple[list[str], list[str]]:
        inputs = domain.sample(rng)
        return inputs, [domain.map(x) for x in FORMATS[fmt](inputs)]

    word = word or FORMAT_WORDS[fmt][0]
    return Task(f"{domain.name}-{word}", domain.name, f"{verb} {word}", generate, kind)


TASKS: tuple[Task, ...] = tuple(
    mapping_task(domain, fmt) for domain in DOMAINS.values() for fmt in TRAINED_FORMATS
)
HELD_OUT: tuple[Task, ...] = tuple(
    task
    for domain in DOMAINS.values()
    for task in (
        mapping_task(domain, "each", verb="convert", word="every", kind="paraphrase"),
        mapping_task(domain, "last", verb="convert", word="final", kind="paraphrase"),
        mapping_task(domain, "reverse", kind="new format"),
    )
)
CLUSTERS: tuple[str, ...] = tuple(DOMAINS)


def get_tasks(names: Iterable[str] | None = None, *, held_out: bool = False) -> list[Task]:
    """The named tasks (training and held-out alike); all training (or held-out) tasks if None."""
    if names is None:
        return list(HELD_OUT if held_out else TASKS)
    names = [names] if isinstance(names, str) else list(names)  # one name, not its letters
    known = {task.name: task for task in (*TASKS, *HELD_OUT)}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InvalidInputError(
            f"unknown toy-world task(s): {', '.join(unknown)}",
            hint=f"`quiver toyworld tasks` lists them; e.g. {', '.join(list(known)[:4])}",
        )
    return [known[name] for name in names]


def pretraining_example(rng: random.Random) -> Example:
    """One line of the base model's generic text over every input vocabulary.

    Half the lines copy the inputs whole (``copy each``: the skill the strength gate checks, and
    the one a small model takes longest to learn), a quarter apply another format to them
    (``repeat final``, ``copy backwards``...), and a quarter give a mapping verb with random
    words as the answer, so the base learns every instruction's shape but no mapping.
    """
    vocabularies = [d.symbols for d in DOMAINS.values()]
    inputs = distinct(rng, rng.choice(vocabularies))
    draw = rng.random()
    fmt = "each" if draw < 0.5 else rng.choice([f for f in FORMATS if f != "each"])
    if draw < 0.75:
        verb, source = rng.choice(COPY_VERBS), inputs
    else:
        fmt = rng.choice(list(FORMATS))
        verb, source = rng.choice(MAPPING_VERBS), rng.sample(rng.choice(vocabularies), len(inputs))
    word = rng.choice(FORMAT_WORDS[fmt])
    return Example(f"{verb} {word} : {' '.join(inputs)}", " ".join(FORMATS[fmt](source)))


def copy_tasks() -> list[Task]:
    """The base model's strength gate: copying each element, per input vocabulary."""

    def copier(domain: Domain) -> Task:
        def generate(rng: random.Random) -> tuple[list[str], list[str]]:
            inputs = domain.sample(rng)
            return inputs, inputs

        return Task(f"copy-{domain.name}", domain.name, "copy each", generate)

    return [copier(domain) for domain in DOMAINS.values()]


def instruction_words() -> list[str]:
    """The words of instructions (verbs, format words and ``:``), not of any input domain."""
    formats = [word for words in FORMAT_WORDS.values() for word in words]
    return list(dict.fromkeys([":", *COPY_VERBS, *MAPPING_VERBS, *formats]))


def vocabulary() -> list[str]:
    """Every word a toy-world prompt or answer can hold (special tokens excluded)."""
    words = instruction_words()
    for domain in DOMAINS.values():
        words += [*domain.symbols, *domain.outputs]
    return list(dict.fromkeys(words))
