"""The base model a library names: stored in a registry as a model repo, loaded from it offline."""

import pytest
import torch

from quiver.errors import NotFoundError
from quiver.registry import LocalRegistry
from quiver.routing.base_model import load_base_model, push_base_model
from quiver.testing import tiny_model, tiny_tokenizer


@pytest.fixture
def registry(tmp_path):
    return LocalRegistry(tmp_path / "store")


def test_a_stored_base_model_loads_back_identical(registry):
    model = tiny_model("llama", seed=3)
    push_base_model(registry, "acme/tiny", model, tiny_tokenizer())

    loaded, tokenizer = load_base_model(registry, "acme/tiny")

    ids = torch.tensor([[1, 40, 41, 42, 43]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tokenizer("hi")["input_ids"] == tiny_tokenizer()("hi")["input_ids"]
    assert tokenizer.chat_template == tiny_tokenizer().chat_template
    folder, _ = registry.download("acme/tiny")
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))  # safetensors only
    assert registry.search()[0].kind == "model"  # a model repo, not an expert


def test_dtype_and_device_are_honoured(registry):
    push_base_model(registry, "acme/tiny", tiny_model("llama"), tiny_tokenizer())

    loaded, _ = load_base_model(registry, "acme/tiny", dtype=torch.bfloat16, device="cpu")

    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert not loaded.training


def test_a_missing_model_names_every_place_tried(registry, hub_server):
    """Not in the registry, and not on the Hub that HF_ENDPOINT names (our server, in tests)."""
    with pytest.raises(NotFoundError) as caught:
        load_base_model(registry, "nobody/nothing")
    message = str(caught.value)
    assert caught.value.repo_id == "nobody/nothing"
    assert registry.location in message and "transformers:" in message


def test_a_repo_that_is_not_a_model_is_reported(registry, tmp_path, hub_server):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.json").write_text("{}")
    registry.upload("acme/notes", folder, message="not a model")

    with pytest.raises(NotFoundError, match=r"has no config\.json"):
        load_base_model(registry, "acme/notes")
