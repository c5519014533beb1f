"""The embedded default: a demo library, installed into a registry on first use, offline, at once.

Until the toy world's trained demo library lands, it is built from ``quiver.testing``: a tiny
random Llama with a byte-level tokenizer, stored as a model repo, and four random LoRA experts
pushed as expert repos and referenced by one library with its Arrow prototypes. It routes and
streams like the real thing but talks nonsense. ``ensure_demo_library`` is the one seam: the toy
world's installer replaces its body.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

from quiver.errors import NotFoundError
from quiver.registry import Expert, Library, Registry
from quiver.routing import compute_arrow_prototypes, save_prototypes
from quiver.routing.arrow import ARTIFACT_NAME
from quiver.routing.base_model import push_base_model
from quiver.testing import make_random_expert, tiny_model, tiny_tokenizer

DEMO_BASE_MODEL = "quiver-demo/tiny-llama"
DEMO_LIBRARY = "quiver-demo/random-experts"
DEMO_EXPERTS = ("amber", "birch", "cobalt", "dune")
_DESCRIPTION = (
    "A random LoRA expert of Quiver's built-in demo (not trained: it changes the tiny random "
    "base model's outputs, nothing more)."
)


def _installed(registry: Registry) -> bool:
    """Whether the demo library is complete (its prototypes are the last thing written)."""
    try:
        library = Library.open(registry, DEMO_LIBRARY)
    except NotFoundError:
        return False
    if ARTIFACT_NAME in library.manifest.artifacts:
        return True
    registry.delete(DEMO_LIBRARY)  # an install that was cut short: start over
    return False


def _demo_base_model():
    """The tiny random Llama. Its generation config suppresses every token but lowercase letters,
    the space and the end of text, so that its nonsense is at least readable."""
    model = tiny_model("llama", seed=0, hidden=64, layers=4, max_position_embeddings=512)
    tokenizer = tiny_tokenizer()
    readable = set(string.ascii_lowercase + " ")
    model.generation_config.suppress_tokens = [
        token
        for token in range(model.config.vocab_size)
        if token != tokenizer.eos_token_id and tokenizer.decode([token]) not in readable
    ]
    model.name_or_path = DEMO_BASE_MODEL  # the experts' adapter_config names it
    return model, tokenizer


def ensure_demo_library(registry: Registry) -> str:
    """The demo library's repo id in ``registry``, installing it (and its base model) if needed."""
    if _installed(registry):
        return DEMO_LIBRARY
    model, tokenizer = _demo_base_model()
    push_base_model(registry, DEMO_BASE_MODEL, model, tokenizer)
    library = Library.create(
        registry,
        DEMO_LIBRARY,
        base_model=DEMO_BASE_MODEL,
        description="Quiver's built-in demo: random LoRA experts on a tiny random Llama.",
    )
    with tempfile.TemporaryDirectory(prefix="quiver-demo-") as scratch:
        for seed, name in enumerate(DEMO_EXPERTS):
            folder = make_random_expert(model, Path(scratch) / name, rank=4, seed=seed)
            expert = Expert.from_folder(folder, tasks=["demo"], description=_DESCRIPTION)
            library.add(registry.push(expert, f"quiver-demo/{name}"))
        prototypes = save_prototypes(
            compute_arrow_prototypes(library), Path(scratch) / "prototypes.safetensors"
        )
        library.add_artifact(ARTIFACT_NAME, prototypes)
    return DEMO_LIBRARY
