"""Training that continues a trained adapter (``init_adapter``), as ELREA's cluster experts do."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import FAST, pairs

from quiver.errors import TrainingError
from quiver.testing import make_random_expert, tiny_model
from quiver.training import TrainConfig, train_expert, train_experts


def _weights(expert):
    return load_file(expert.path / "adapter_model.safetensors")


def test_an_expert_starts_from_the_adapter_and_keeps_its_shape(model, tokenizer, tmp_path):
    base = train_expert(
        model, pairs("upper"), task="upper", config=FAST, tokenizer=tokenizer,
        output_dir=tmp_path / "base",
    )  # fmt: skip
    # A config of another rank and a learning rate too small to move anything: the expert is
    # the base adapter, rank, alpha and weights (a fresh LoRA would start with B = 0).
    still = dataclasses.replace(FAST, rank=8, alpha=32.0, learning_rate=1e-12, max_steps=2)
    expert = train_expert(
        model, pairs("reverse"), task="reverse", config=still, tokenizer=tokenizer,
        output_dir=tmp_path / "still", init_adapter=base,
    )  # fmt: skip
    assert (expert.card.rank, expert.card.hyperparameters["alpha"]) == (4, 16.0)
    assert expert.card.hyperparameters["init_adapter"] == f"sha256:{base.weights_sha256}"
    before, after = _weights(base), _weights(expert)
    assert set(before) == set(after)
    assert any(name.endswith("lora_B.weight") and t.abs().max() > 0 for name, t in after.items())
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, atol=1e-6, rtol=0)
    # Training on for real moves away from the base, on every backend's code path.
    [moved] = train_experts(
        model, {"reverse": pairs("reverse")}, config=FAST, tokenizer=tokenizer,
        output_dir=tmp_path / "moved", init_adapter=base.path,
    )  # fmt: skip
    moved_weights = _weights(moved.expert)
    assert moved.expert.card.hyperparameters["init_adapter"] == f"sha256:{base.weights_sha256}"
    assert any(not torch.allclose(moved_weights[n], t) for n, t in before.items())
    assert dict(model.named_parameters()).keys() == dict(tiny_model().named_parameters()).keys()


def test_an_adapter_of_another_model_is_refused(model, tokenizer, tmp_path):
    other = make_random_expert(tiny_model("llama", hidden=64), tmp_path / "wide", rank=4)
    with pytest.raises(TrainingError, match="does not fit this model"):
        train_expert(
            model, pairs("upper"), task="upper", config=FAST, tokenizer=tokenizer,
            init_adapter=other,
        )  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="has no adapter_config"):
        train_expert(
            model, pairs("upper"), task="upper", config=TrainConfig(max_steps=1),
            tokenizer=tokenizer, init_adapter=tmp_path / "empty",
        )  # fmt: skip
