"""The base model a library names: stored in a registry as a plain model repo, loaded from there.

A library pins its experts but only names its base model. ``load_base_model`` looks for that name
in the library's registry first (a repo with ``config.json``, ``model.safetensors`` and tokenizer
files, as ``push_base_model`` writes it), then as transformers resolves it (the Hub,
``HF_ENDPOINT``, the Hugging Face cache). Weights are safetensors only and remote code never runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quiver.errors import NotFoundError, QuiverError
from quiver.registry.base import Registry

# What a causal LM and its tokenizer are made of; never a pickle.
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "README.md")


def push_base_model(
    registry: Registry,
    repo_id: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    message: str | None = None,
) -> str:
    """Store ``model`` and ``tokenizer`` as the model repo ``repo_id``; return the commit."""
    with tempfile.TemporaryDirectory(prefix="quiver-base-model-") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        data = ModelCardData(
            library_name="transformers", pipeline_tag="text-generation", tags=["quiver"]
        )
        text = f"# {repo_id}\n\nA base model for Quiver libraries, stored with `push_base_model`."
        ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n").save(Path(staging) / "README.md")
        return registry.upload(
            repo_id, Path(staging), message=message or f"Upload base model {repo_id}"
        )


def _load(
    source: str | Path, dtype: torch.dtype | None, device: str | torch.device | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_base_model(
    registry: Registry | None,
    base_model_id: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``base_model_id`` and its tokenizer: from ``registry`` if it holds that model repo,
    else as transformers resolves the name. ``NotFoundError`` says what each place answered."""
    tried = []
    if registry is not None:
        try:
            folder, _ = registry.download(base_model_id, patterns=MODEL_FILES)
        except QuiverError as error:  # not there, not a repo id, unreachable: try transformers
            tried.append(f"{registry.location}: {error}")
        else:
            if (folder / "config.json").is_file():
                return _load(folder, dtype, device)
            tried.append(f"{registry.location}: the repo has no config.json")
    try:
        return _load(base_model_id, dtype, device)
    except (OSError, ValueError) as error:  # transformers' "not found", "no safetensors", ...
        tried.append(f"transformers: {str(error).strip().splitlines()[0]}")
    raise NotFoundError(
        f"cannot load the base model {base_model_id!r}; tried " + "; ".join(tried),
        hint="store it in the library's registry with push_base_model (config.json, "
        "model.safetensors, tokenizer files), or make it reachable on the Hub or in the "
        "Hugging Face cache",
        repo_id=base_model_id,
    )
