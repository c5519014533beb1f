"""The Library tab's work: compose, compare experts, store prototypes."""

import pytest
import torch
from app_helpers import RANDOM_BASE_MODEL, RANDOM_EXPERTS

from quiver.app.demo import DEMO_LIBRARY
from quiver.app.libraries import cluster_library, cluster_rows, compose, store_prototypes
from quiver.errors import IncompatibleExpertError, InvalidInputError, NotFoundError, TrainingError
from quiver.registry import Expert, Library, LocalRegistry
from quiver.routing import compute_arrow_prototypes, load_experts, load_prototypes
from quiver.routing.arrow import ARTIFACT_NAME
from quiver.testing import make_random_expert, tiny_model


def test_clusters_and_heat_map_come_from_the_cosine_of_the_full_weight_updates(local_registry):
    library = Library.pull(local_registry, DEMO_LIBRARY)
    experts = load_experts(library, dtype=torch.float64)
    dense = torch.stack(
        [
            torch.cat([(s.scaled_B()[e] @ s.A[e]).flatten() for s in experts.modules.values()])
            for e in range(len(experts.names))
        ]
    )
    unit = dense / dense.norm(dim=1, keepdim=True)

    clustering = cluster_library(library, k=2)

    assert clustering.names == tuple(library.names) and clustering.k == 2
    torch.testing.assert_close(
        torch.from_numpy(clustering.similarity), unit @ unit.T, atol=1e-6, rtol=1e-5
    )
    rows = cluster_rows(clustering)
    assert [name for name, _ in rows] == ["cluster-0", "cluster-1"]
    assert sorted(e for _, names in rows for e in names.split(", ")) == sorted(library.names)
    shown = [t.get_text() for t in clustering.figure().axes[0].get_yticklabels()]
    assert shown == [e for _, names in rows for e in names.split(", ")]  # ordered by cluster
    assert 2 <= cluster_library(library).k <= 3  # k suggested by the silhouette

    with pytest.raises(TrainingError, match="cannot make 5 clusters of 4 experts"):
        cluster_library(library, k=5)
    single = Library.create(local_registry, "acme/solo", base_model=library.manifest.base_model)
    single.add(library.expert_paths()[library.names[0]])
    with pytest.raises(InvalidInputError, match="fewer than two experts: nothing to compare"):
        cluster_library(single)


def test_compose_references_experts_of_the_same_registry(local_registry, random_library):
    ids = [f"quiver-test/{name}" for name in RANDOM_EXPERTS[:2]]

    library = compose(local_registry, "acme/pair", local_registry, ids, "two of the demo's")

    assert library.names == list(RANDOM_EXPERTS[:2])
    assert [pin.repo_id for pin in library.experts] == ids
    assert library.manifest.base_model == RANDOM_BASE_MODEL


def test_compose_into_another_registry_bundles_experts(local_registry, random_library, tmp_path):
    elsewhere = LocalRegistry(tmp_path / "elsewhere")

    library = compose(elsewhere, "acme/copy", local_registry, ["quiver-test/amber"])

    assert library.experts[0].bundled
    assert Library.pull(elsewhere, "acme/copy").expert_paths()["amber"].is_dir()


def test_an_expert_that_does_not_fit_writes_nothing(local_registry, random_library, tmp_path):
    other_base = tiny_model("llama", hidden=48)
    other_base.name_or_path = "acme/other-base"
    folder = make_random_expert(other_base, tmp_path / "misfit", rank=4)
    local_registry.push(Expert.from_folder(folder), "acme/misfit")

    with pytest.raises(IncompatibleExpertError, match="base model"):
        compose(local_registry, "acme/mixed", local_registry, ["quiver-test/amber", "acme/misfit"])
    with pytest.raises(NotFoundError):
        Library.open(local_registry, "acme/mixed")
    with pytest.raises(InvalidInputError, match="no experts chosen"):
        compose(local_registry, "acme/none", local_registry, [])


def test_prototypes_are_stored_as_the_library_artifact(local_registry, random_library):
    library = compose(local_registry, "acme/protos", local_registry, ["quiver-test/birch"])
    assert ARTIFACT_NAME not in library.manifest.artifacts

    stored = store_prototypes(library)

    reopened = Library.open(local_registry, "acme/protos")
    assert reopened.commit == stored.commit
    prototypes = load_prototypes(reopened.artifact_path(ARTIFACT_NAME))
    expected = compute_arrow_prototypes(reopened)
    assert prototypes.expert_names == expected.expert_names
    for module, vectors in expected.vectors.items():
        torch.testing.assert_close(prototypes.vectors[module], vectors)
