"""MBC: the exact update cosine, planted clusters recovered from a pulled library, the errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import planted_experts

from quiver.errors import IncompatibleExpertError, InvalidAdapterError, TrainingError
from quiver.registry import Library, LocalRegistry
from quiver.routing import load_experts
from quiver.testing import make_random_expert, tiny_model
from quiver.training import cluster_experts
from quiver.training.mbc import parameter_similarity, update_similarity


def _partition(groups):
    return sorted(sorted(members) for members in groups)


def test_update_similarity_equals_the_dense_cosine(model, tmp_path):
    paths = {
        f"e{i}": make_random_expert(model, tmp_path / f"e{i}", rank=rank, alpha=a, seed=i)
        for i, (rank, a) in enumerate([(4, 16), (8, 8), (4, 4)])
    }
    experts = load_experts(paths)
    dense = []
    for name in experts.names:
        i = experts.index(name)
        dense.append(
            torch.cat(
                [
                    (s.scales[i] * s.B[i].double() @ s.A[i].double()).flatten()
                    for s in experts.modules.values()
                ]
            )
        )
    dense = torch.nn.functional.normalize(torch.stack(dense), dim=1)
    np.testing.assert_allclose(update_similarity(experts), (dense @ dense.T).numpy(), atol=1e-10)


@pytest.mark.parametrize("embedding", ["update", "parameters"])
def test_planted_clusters_are_recovered_from_a_pulled_library(model, tmp_path, embedding):
    paths, truth = planted_experts(model, tmp_path / "peft", groups=3, per_group=3)
    registry = LocalRegistry(tmp_path / "store")
    library = Library.create(registry, "me/planted", base_model=model.name_or_path)
    for name, folder in paths.items():
        library.add(registry.push(folder, f"me/{name}"))
    pulled = Library.pull(registry, "me/planted")

    clustering = cluster_experts(pulled, k=3, embedding=embedding)
    planted = [[n for n in truth if truth[n] == g] for g in range(3)]
    assert _partition(clustering.clusters.values()) == _partition(planted)
    assert clustering.clusters["cluster-0"] == ["g0-e0", "g0-e1", "g0-e2"]
    assert cluster_experts(pulled, embedding=embedding).k == 3  # the silhouette's suggestion


def test_the_update_embedding_clusters_experts_from_independent_inits(model, tmp_path):
    paths, truth = planted_experts(model, tmp_path, groups=3, per_group=3, refactor=True)
    clustering = cluster_experts(paths, k=3)
    planted = [[n for n in truth if truth[n] == g] for g in range(3)]
    assert _partition(clustering.clusters.values()) == _partition(planted)
    # Re-factored twins: the same update (cosine 1), but parameters that no longer line up.
    same, _ = planted_experts(model, tmp_path / "twin", groups=1, per_group=1, noise=0)
    twin, _ = planted_experts(
        model, tmp_path / "twin2", groups=1, per_group=1, noise=0, refactor=True
    )
    pair = load_experts({"a": same["g0-e0"], "b": twin["g0-e0"]})
    assert update_similarity(pair)[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert parameter_similarity(pair, sparsity=0.0)[0, 1] < 0.9


def test_heat_map_and_json(model, tmp_path):
    paths, _ = planted_experts(model, tmp_path, groups=2, per_group=2)
    clustering = cluster_experts(paths, k=2)
    png = clustering.plot(tmp_path / "mbc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert json.loads(json.dumps(clustering.clusters)) == {
        "cluster-0": ["g0-e0", "g0-e1"],
        "cluster-1": ["g1-e0", "g1-e1"],
    }


def test_bad_requests_are_refused(model, tmp_path):
    paths, _ = planted_experts(model, tmp_path, groups=2, per_group=2)
    for k in (0, 5):
        with pytest.raises(TrainingError, match=f"cannot make {k} clusters of 4 experts"):
            cluster_experts(paths, k=k)
    with pytest.raises(TrainingError, match="unknown embedding"):
        cluster_experts(paths, embedding="prototypes")
    other = make_random_expert(tiny_model("qwen2"), tmp_path / "qwen", rank=4)
    with pytest.raises(IncompatibleExpertError, match="adapts 'quiver-testing/tiny-qwen2'"):
        cluster_experts({**paths, "qwen": other})
    wider = tiny_model("llama", hidden=64)
    wider.name_or_path = model.name_or_path  # same name, other shapes
    make_random_expert(
        wider, tmp_path / "wide", rank=4, target_modules=("q_proj", "v_proj", "down_proj")
    )
    with pytest.raises(IncompatibleExpertError, match=r"'wide' at .* has shapes"):
        cluster_experts({**paths, "wide": tmp_path / "wide"})


def test_k_and_seed_must_be_integers(model, tmp_path):
    paths, _ = planted_experts(model, tmp_path, groups=2, per_group=2)
    for k in (2.5, "2", True):  # True was taken as k=1
        with pytest.raises(TrainingError, match="k must be an integer"):
            cluster_experts(paths, k=k)
    with pytest.raises(TrainingError, match="seed must be an integer"):
        cluster_experts(paths, k=2, seed="0")


def test_folders_that_are_not_experts_or_hold_nan_are_named(model, tmp_path):
    paths, _ = planted_experts(model, tmp_path / "peft", groups=2, per_group=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    for name, message in (("empty", "has no adapter_config.json"), ("broken", "not valid JSON")):
        with pytest.raises(InvalidAdapterError, match=rf"expert .{name}.*{message}"):
            cluster_experts({**paths, name: tmp_path / name}, k=2)
    diverged = tmp_path / "peft" / "g1-e1" / "adapter_model.safetensors"
    tensors = load_file(diverged)
    next(t for key, t in tensors.items() if "lora_B" in key)[0, 0] = float("nan")
    save_file(tensors, diverged)
    for embedding in ("update", "parameters"):  # raw ValueError / silently clustered before
        with pytest.raises(InvalidAdapterError, match=r"'g1-e1' .* holds NaN or infinite"):
            cluster_experts(paths, k=2, embedding=embedding)


def test_an_expert_whose_update_is_zero_is_named(model, tmp_path):
    """A LoRA fresh from PEFT (B = 0) has no direction to compare: it was put in a cluster."""
    paths, _ = planted_experts(model, tmp_path / "peft", groups=2, per_group=2)
    untrained = tmp_path / "peft" / "g0-e1" / "adapter_model.safetensors"
    tensors = {k: t * 0 if "lora_B" in k else t for k, t in load_file(untrained).items()}
    save_file(tensors, untrained)
    with pytest.raises(InvalidAdapterError, match="'g0-e1' changes nothing"):
        cluster_experts(paths, k=2)
