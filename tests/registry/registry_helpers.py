"""Helpers shared by the registry tests."""

import torch

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
