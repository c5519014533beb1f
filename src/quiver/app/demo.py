"""The embedded default: the toy world's demo library, installed into a registry on first use.

``quiver.toyworld`` ships it in the package: a tiny trained Llama (word-level tokenizer, 32
positions), one LoRA expert per MBC cluster of its tasks (numbers, letter pairs, symbol pairs,
words), bundled in the library with its Arrow prototypes and its routing advice (Arrow per sequence,
scored at the first block; ELREA over its sibling library, built from the same data), and that
ELREA library; it installs offline in well under a second.
``ensure_demo_library`` is the app's one seam to it.

``install_random_library`` puts random LoRA experts over any model into a registry: the app on a
model of a size of your choosing (``benchmarks/app.py`` measures the app so), with answers as long
as asked for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from quiver.registry import Expert, Library, Registry
from quiver.routing import compute_arrow_prototypes, save_prototypes
from quiver.routing.arrow import ARTIFACT_NAME
from quiver.routing.base_model import push_base_model
from quiver.testing import make_random_expert
from quiver.toyworld import DEMO_BASE_MODEL, DEMO_ELREA_LIBRARY, DEMO_LIBRARY, install_demo

__all__ = [
    "DEMO_BASE_MODEL",
    "DEMO_ELREA_LIBRARY",
    "DEMO_LIBRARY",
    "DEMO_PROMPTS",
    "ensure_demo_library",
    "install_random_library",
]

# The demo's language: an instruction, a colon, 3 to 6 numbers, letter pairs, symbol pairs or
# words, each mapped by its domain's lookup table. Arrow per sequence routes these to their
# cluster's expert (see the README's toy world for how often it does in general).
DEMO_PROMPTS = (
    "map each : bar dis fun",
    "map last : !? @# #$",
    "map each : 12 40 7 33",
    "map ends : BE CI DO AU",
)

_RANDOM_EXPERT = (
    "A random LoRA expert (not trained: it changes the base model's outputs, nothing more)."
)


def ensure_demo_library(registry: Registry) -> str:
    """The demo library's repo id in ``registry``, installing it (and its base model) if needed."""
    return install_demo(registry)


def install_random_library(
    registry: Registry,
    library_id: str,
    model,
    tokenizer,
    *,
    experts: tuple[str, ...] = ("amber", "birch", "cobalt", "dune"),
    rank: int = 4,
    description: str = "Random LoRA experts.",
) -> Library:
    """Push ``model`` (as the repo its ``name_or_path`` names), a random LoRA expert per name of
    ``experts`` (task ``random``, in the library's namespace) and the library of them with its
    Arrow prototypes."""
    push_base_model(registry, model.name_or_path, model, tokenizer)
    namespace = library_id.split("/")[0]
    with tempfile.TemporaryDirectory(prefix="quiver-random-") as scratch:
        pushed = {}
        for seed, name in enumerate(experts):
            folder = make_random_expert(model, Path(scratch) / name, rank=rank, seed=seed)
            expert = Expert.from_folder(folder, tasks=["random"], description=_RANDOM_EXPERT)
            pushed[name] = registry.push(expert, f"{namespace}/{name}")
        prototypes = save_prototypes(
            compute_arrow_prototypes({name: expert.path for name, expert in pushed.items()}),
            Path(scratch) / "prototypes.safetensors",
        )
        return Library.create(
            registry,
            library_id,
            base_model=model.name_or_path,
            description=description,
            experts=pushed,
            artifacts={ARTIFACT_NAME: prototypes},
        )
