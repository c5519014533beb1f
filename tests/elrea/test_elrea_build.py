"""ELREA libraries: the gradient clusters recover planted kinds; the library holds the base
adapter, one expert per cluster trained on from it, and an artifact that travels with it."""

import numpy as np
import pytest
import torch
from elrea_helpers import FAST, planted_pairs
from sklearn.metrics import adjusted_rand_score

from quiver.errors import AlreadyExistsError, RoutingError, TrainingError
from quiver.registry import Library, open_registry
from quiver.routing import route
from quiver.routing.elrea import ensemble_choice
from quiver.routing.elrea_artifact import ElreaArtifact, stored_artifact
from quiver.routing.gradients import CountSketch
from quiver.testing import tiny_model
from quiver.training.data import load_examples
from quiver.training.elrea import (
    build_elrea_library,
    cluster_features,
    gradient_features,
    prompt_ids,
)


def test_gradient_clusters_recover_the_planted_kinds(planted, tokenizer):
    _, library, pairs, truth = planted
    build = library.manifest.build
    assert (build["method"], build["k"], build["clustering"], build["examples"]) == (
        "elrea", 3, "birch", 36,
    )  # fmt: skip
    assert library.names == ["base", "cluster-0", "cluster-1", "cluster-2"]
    # The build's clustering, replayed from the library's base adapter with the same settings.
    prompts = prompt_ids(load_examples(pairs), tokenizer, max_length=256)
    base = library.expert_paths()["base"]
    features = gradient_features(tiny_model(), base, prompts, CountSketch(256, 0), pad_id=0)
    labels = cluster_features(features, 3)
    assert adjusted_rand_score(truth, labels) == 1.0
    assert adjusted_rand_score(truth, cluster_features(features, 3, method="kmeans")) == 1.0
    sizes = {f"cluster-{c}": int(n) for c, n in enumerate(np.bincount(labels))}
    assert build["cluster_sizes"] == sizes == {"cluster-0": 12, "cluster-1": 12, "cluster-2": 12}
    # The artifact: centroids are the clusters' mean features (the base's: the mean of all).
    artifact = stored_artifact(library)
    assert artifact.expert_names == tuple(library.names)
    means = [features.mean(0)] + [features[labels == c].mean(0) for c in range(3)]
    expected = torch.nn.functional.normalize(torch.stack(means), dim=1)
    torch.testing.assert_close(artifact.centroids, expected, atol=1e-5, rtol=0)
    assert (artifact.similarity_std > 0).all()
    # Every expert continued from the base adapter, on its cluster's examples.
    base_sha = library.experts[0].sha256
    for name, expert in library.fetch().items():
        if name != "base":
            assert expert.card.hyperparameters["init_adapter"] == f"sha256:{base_sha}"
            assert expert.card.examples == sizes[name]


def test_the_library_pushes_and_pulls_with_its_artifact(planted, hub_server, tokenizer):
    _, library, _, _ = planted
    hub = open_registry(hub_server.endpoint, token=hub_server.create_token("elrea", write=True))
    library.push(hub, "elrea/planted")
    pulled = Library.pull(hub, "elrea/planted")
    assert pulled.manifest.artifacts == library.manifest.artifacts
    batch = tokenizer(["sum 123 456 789 =", "reverse abcdef:"], return_tensors="pt", padding=True)
    choices = []
    for source in (library, pulled):
        routed = route(tiny_model(), source, "elrea")
        choices.append(ensemble_choice(routed, batch.input_ids, batch.attention_mask))
    torch.testing.assert_close(choices[0].weights, choices[1].weights)
    with torch.no_grad():  # other strategies route an ELREA library's members too
        assert route(tiny_model(), pulled, "arrow", top_k=2)(**batch).logits.isfinite().all()


def test_artifact_round_trip_and_malformed_files(planted, tmp_path):
    _, library, _, _ = planted
    artifact = stored_artifact(library)
    again = ElreaArtifact.load(artifact.save(tmp_path / "copy.safetensors"))
    assert (again.expert_names, again.projection, again.gradient_dim) == (
        artifact.expert_names, artifact.projection, artifact.gradient_dim,
    )  # fmt: skip
    torch.testing.assert_close(again.centroids, artifact.centroids)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RoutingError, match="not a readable elrea artifact"):
        ElreaArtifact.load(tmp_path / "junk.safetensors")
    with pytest.raises(RoutingError, match="not a readable elrea artifact"):
        ElreaArtifact.load(library.artifact_path("elrea").with_name("missing.safetensors"))


def test_bad_builds_are_refused_before_training(tmp_path, tokenizer):
    from quiver.registry import LocalRegistry

    registry, model = LocalRegistry(tmp_path / "store"), tiny_model()
    pairs = [("sum 1 2 =", "3"), ("reverse ab:", "ba")]
    common = dict(base_model=model, tokenizer=tokenizer, progress=False)
    with pytest.raises(TrainingError, match="cannot make 3 clusters of 2 examples"):
        build_elrea_library(pairs, registry, "me/x", k=3, **common)
    with pytest.raises(TrainingError, match="unknown clustering 'dbscan'"):
        build_elrea_library(pairs, registry, "me/x", k=2, clustering="dbscan", **common)
    with pytest.raises(TrainingError, match="example 2: the prompt has 1 token"):
        build_elrea_library([*pairs, ("x", "y")], registry, "me/x", k=2, **common)
    with pytest.raises(TrainingError, match="projection_dim must be at least 1"):
        build_elrea_library(pairs, registry, "me/x", k=2, projection_dim=0, **common)
    for k in (1.5, "2", True):  # a raw sklearn or TypeError, or one cluster for True, before
        with pytest.raises(TrainingError, match=r"k must be at least 1 \(an integer\)"):
            build_elrea_library(pairs, registry, "me/x", k=k, **common)
    assert registry.head("me/x") is None  # nothing was published
    Library.create(registry, "me/taken", base_model=model.name_or_path)
    with pytest.raises(AlreadyExistsError, match="me/taken already exists"):
        build_elrea_library(pairs, registry, "me/taken", k=2, **common)
    with pytest.raises(TrainingError, match="found fewer than 3 clusters"):
        cluster_features(torch.eye(4)[[0, 0, 0, 1]], 3)  # two distinct points


def test_an_interrupted_build_leaves_no_half_built_library(tmp_path, tokenizer, monkeypatch):
    """Interrupted on its last step (the artifact), after every expert was trained, the build
    leaves nothing in the registry: the library is published whole, in one commit."""
    import quiver.training.elrea as elrea
    from quiver.registry import LocalRegistry

    registry = LocalRegistry(tmp_path / "store")
    pairs = planted_pairs([0, 0, 1, 1], seed=0)
    settings = dict(base_model=tiny_model(), tokenizer=tokenizer, k=2, progress=False)
    settings.update(config=FAST, projection_dim=64, clustering="kmeans")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(elrea, "elrea_artifact", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_elrea_library(pairs, registry, "me/elrea", **settings)
    assert registry.head("me/elrea") is None
    monkeypatch.undo()
    library = build_elrea_library(pairs, registry, "me/elrea", **settings)
    assert len(library.versions()) == 1
    assert library.names == ["base", "cluster-0", "cluster-1"]
