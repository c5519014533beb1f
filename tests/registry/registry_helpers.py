"""Helpers shared by the registry tests."""

import torch
from huggingface_hub import EvalResult
from peft import IA3Config

from quiver.registry import LocalRegistry


def logits(model, inputs=None):
    inputs = torch.arange(3, 19).reshape(2, 8) if inputs is None else inputs
    with torch.no_grad():
        return model(input_ids=inputs).logits


def store_state(registry: LocalRegistry):
    """Everything a reader of the local store can see: repos with their versions, and snapshots."""
    repos = {
        hit.repo_id: [v.commit for v in registry.versions(hit.repo_id)] for hit in registry.list()
    }
    snapshots = sorted(p.name for p in (registry.root / "snapshots").iterdir())
    return repos, snapshots


def gsm8k_result(accuracy: float = 0.42) -> EvalResult:
    """An eval result for a card's model-index."""
    return EvalResult(
        task_type="text-generation",
        dataset_type="gsm8k",
        dataset_name="GSM8K",
        metric_type="accuracy",
        metric_value=accuracy,
    )


def ia3_config() -> IA3Config:
    """A PEFT adapter config that is not a LoRA."""
    return IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
