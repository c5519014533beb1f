"""Shared fixtures: one tiny base model per session and factories for expert folders."""

import json
from pathlib import Path

import pytest

from quiver.registry import LocalRegistry
from quiver.testing import make_random_expert, tiny_model


@pytest.fixture(scope="session")
def base_model():
    return tiny_model("llama", seed=0)


@pytest.fixture
def make_expert(base_model, tmp_path):
    """Write a random LoRA folder; ``**config_changes`` edit its adapter_config.json afterwards."""
    counter = iter(range(1000))

    def make(name=None, *, rank=4, seed=None, target_modules=None, **config_changes) -> Path:
        index = next(counter)
        path = tmp_path / "experts" / (name or f"expert-{index}")
        make_random_expert(
            base_model,
            path,
            rank=rank,
            seed=index if seed is None else seed,
            target_modules=target_modules,
        )
        if config_changes:
            config_path = path / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config.update(config_changes)
            config_path.write_text(json.dumps(config))
        return path

    return make


@pytest.fixture
def local(tmp_path):
    return LocalRegistry(tmp_path / "store")
