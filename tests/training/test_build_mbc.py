"""MBC libraries: merged without data, trained per cluster with data, routed with Arrow."""

import pytest
import torch
from training_helpers import FAST, pairs, planted_experts

import quiver
from quiver.errors import AlreadyExistsError, TrainingError
from quiver.registry import Library, LocalRegistry
from quiver.routing import load_experts
from quiver.training import build_mbc_library, train_experts
from quiver.training.merge import merged_factors


def _dense(experts, name):
    i = experts.index(name)
    return {
        m: s.scales[i].double() * s.B[i].double() @ s.A[i].double()
        for m, s in experts.modules.items()
    }


@pytest.fixture
def planted_library(model, tmp_path):
    paths, _ = planted_experts(model, tmp_path / "peft", groups=3, per_group=2)
    registry = LocalRegistry(tmp_path / "store")
    library = Library.create(registry, "me/planted", base_model=model.name_or_path)
    for folder in paths.values():
        library.add(folder)  # bundled
    return registry, Library.pull(registry, "me/planted")


def test_merges_are_the_mean_update_exactly_or_its_best_rank_r(model, tmp_path):
    paths, _ = planted_experts(model, tmp_path, groups=1, per_group=3)
    experts = load_experts(paths)
    members = list(paths)
    mean = {m: sum(_dense(experts, n)[m] for n in members) / 3 for m in experts.modules}
    exact, rank, alpha = merged_factors(experts, members, method="concat")
    assert (rank, alpha) == (12, 12.0)
    truncated, rank, _ = merged_factors(experts, members, method="svd")
    assert rank == 4
    averaged, rank, alpha = merged_factors(experts, members, method="mu")
    assert (rank, alpha) == (4, 8.0)  # the members' own rank and alpha
    for module, (lora_a, lora_b) in averaged.items():
        torch.testing.assert_close(lora_a, experts.modules[module].A.mean(0))
        torch.testing.assert_close(lora_b, experts.modules[module].B.mean(0))
    for module, (lora_a, lora_b) in exact.items():
        torch.testing.assert_close(
            lora_b.double() @ lora_a.double(), mean[module], rtol=1e-5, atol=1e-6
        )
        u, s, vh = torch.linalg.svd(mean[module])
        best = u[:, :4] * s[:4] @ vh[:4]
        lora_a, lora_b = truncated[module]
        torch.testing.assert_close(lora_b.double() @ lora_a.double(), best, rtol=1e-4, atol=1e-5)


def test_data_free_mbc_library_records_its_build_and_routes(model, planted_library):
    registry, source = planted_library
    library = build_mbc_library(source, registry, "me/mbc", k=3, merge="concat")
    build = library.manifest.build
    assert (build["method"], build["k"], build["experts"]) == ("mbc", 3, "merged (concat)")
    assert build["clusters"] == {
        f"cluster-{g}": [f"me/planted/experts/g{g}-e0", f"me/planted/experts/g{g}-e1"]
        for g in range(3)
    }
    assert build["source"] == f"me/planted@{source.commit}"
    assert library.names == ["cluster-0", "cluster-1", "cluster-2"]
    assert "arrow_prototypes" in library.manifest.artifacts
    reopened = Library.pull(registry, "me/mbc")
    card = reopened.fetch()["cluster-1"].card
    assert card.merged_from == build["clusters"]["cluster-1"]
    assert card.description.startswith("Merged, not trained")
    assert reopened.manifest.rank == 8  # two rank-4 members, concatenated
    # The merged expert's update is its members' mean, and the library routes.
    stacked = load_experts(source.expert_paths())
    merged = load_experts(reopened.expert_paths())
    for module in stacked.modules:
        mean = (_dense(stacked, "g1-e0")[module] + _dense(stacked, "g1-e1")[module]) / 2
        torch.testing.assert_close(_dense(merged, "cluster-1")[module], mean, rtol=1e-4, atol=1e-6)
    routed = quiver.route(model, reopened, "arrow", top_k=2)
    with torch.no_grad():
        assert torch.isfinite(routed(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    routed.unroute()


def test_trained_mbc_library_trains_each_cluster_on_its_tasks(model, tokenizer, tmp_path):
    data = {task: pairs(task) for task in ("upper", "reverse", "double")}
    trained = train_experts(model, data, config=FAST, tokenizer=tokenizer)
    folders = {r.name: r.path for r in trained}
    registry = LocalRegistry(tmp_path / "store")
    with pytest.raises(TrainingError, match="no data for the tasks reverse"):
        build_mbc_library(
            folders,
            registry,
            "me/x",
            k=2,
            data={"upper": data["upper"], "double": data["double"]},
            base_model=model,
            tokenizer=tokenizer,
        )
    library = build_mbc_library(
        folders,
        registry,
        "me/mbc",
        k=2,
        data=data,
        base_model=model,
        tokenizer=tokenizer,
        config=FAST,
    )
    build = library.manifest.build
    assert build["experts"] == "trained"
    assert sorted(t for tasks in build["tasks"].values() for t in tasks) == sorted(data)
    for cluster, expert in library.fetch().items():
        assert expert.card.tasks == build["tasks"][cluster]
        assert expert.card.examples == 10 * len(build["tasks"][cluster])
        assert not expert.card.merged_from


def test_an_interrupted_build_leaves_no_half_built_library(model, tmp_path, monkeypatch):
    """The library is published as one version, after everything it holds is made: a build
    interrupted on its last step (the Arrow prototypes) leaves nothing in the registry."""
    import quiver.training.build as build

    paths, _ = planted_experts(model, tmp_path / "peft", groups=2, per_group=2)
    registry = LocalRegistry(tmp_path / "store")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "save_prototypes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_mbc_library(paths, registry, "me/mbc", k=2)
    assert registry.head("me/mbc") is None
    monkeypatch.undo()
    library = build_mbc_library(paths, registry, "me/mbc", k=2)
    assert len(library.versions()) == 1  # created whole, in one commit
    assert sorted(library.names) == ["cluster-0", "cluster-1"]
    assert library.artifact_path("arrow_prototypes").is_file()


def test_a_taken_name_or_an_unknown_merge_is_refused_before_any_work(model, tmp_path, monkeypatch):
    import quiver.training.build as build

    paths, _ = planted_experts(model, tmp_path / "peft", groups=2, per_group=2)
    registry = LocalRegistry(tmp_path / "store")
    Library.create(registry, "me/taken", base_model=model.name_or_path)

    def no_work(*args, **kwargs):
        raise AssertionError("clustered or trained before checking the request")

    monkeypatch.setattr(build, "cluster_experts", no_work)
    with pytest.raises(AlreadyExistsError, match="me/taken already exists"):
        build_mbc_library(paths, registry, "me/taken", k=2, data={"a": [("x", "y")]})
    with pytest.raises(TrainingError, match="unknown merge 'average'"):
        build_mbc_library(paths, registry, "me/new", k=2, merge="average")
    assert registry.head("me/new") is None
