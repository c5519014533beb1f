"""The benchmark end to end (a reduced run from the prebuilt base), its gates and bad input."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from quiver.errors import InvalidInputError, TrainingError
from quiver.registry import Library, LocalRegistry
from quiver.toyworld import DEMO_FOLDER, RunConfig, run_benchmark
from quiver.toyworld.evaluate import Evaluation, TaskResult
from quiver.toyworld.model import build_tokenizer, model_config
from quiver.toyworld.pipeline import ElreaClusters, check_base, check_experts
from quiver.toyworld.tasks import get_tasks


@pytest.mark.slow
def test_reduced_run_routes_held_out_tasks_to_the_right_cluster(tmp_path):
    torch.set_num_threads(1)
    config = RunConfig.reduced(base=str(DEMO_FOLDER / "base"))
    registry = LocalRegistry(tmp_path / "registry")
    results = run_benchmark(config, tmp_path / "out", registry=registry, say=print)

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "results.png").stat().st_size > 10_000
    assert "| Arrow per sequence, top-1 | MBC |" in (tmp_path / "out" / "results.md").read_text()
    methods = {(row["method"], row["library"]) for row in saved["rows"]}
    for expected in [("base", "-"), ("shared", "-"), ("ELREA, all members", "ELREA"),
                     ("ELREA, top-1", "ELREA"), ("oracle", "MBC"),
                     ("uniform merge (mu)", "private"), ("Arrow per token, top-4", "private"),
                     ("Arrow per sequence, top-1", "MBC"),
                     ("Arrow per sequence, top-1, first block", "MBC")]:  # fmt: skip
        assert expected in methods
    assert results.adjusted_rand == 1.0  # MBC finds the two designed clusters
    sequence = results.row("Arrow per sequence, top-1", "MBC").summary()
    assert sequence["right_cluster_held_out"] > 0.5  # better than chance between two clusters
    first_block = results.row("Arrow per sequence, top-1, first block", "MBC").summary()
    assert first_block["right_cluster_train"] > 0.8  # all blocks: 0.50 (measured 0.87)
    assert first_block["right_cluster_held_out"] > 0.7  # all blocks: 0.66 (measured 0.74)
    base = results.row("base", "-").summary()
    assert sequence["held_out_em"] > base["held_out_em"]
    assert results.row("oracle", "MBC").summary()["train_em"] >= 0.9
    assert registry.refs("quiver-demo/toyworld")  # the libraries went through the registry
    advice = Library.open(registry, "quiver-demo/toyworld").manifest.routing
    assert advice["arrow"]["prompt_layers"] == [0]  # what the app's chat starts from
    assert advice["elrea"] == {"library": "quiver-demo/toyworld-elrea"}
    # ELREA: built on all four tasks' examples pooled, pulled from the registry, routed per prompt
    assert registry.refs("quiver-demo/toyworld-elrea")
    assert set(saved["elrea_clusters"]["members"]) == {"cluster-0", "cluster-1"}
    for task in config.tasks:  # the sample: 100 training examples of each task, each in a cluster
        assert sum(c.get(task, 0) for c in saved["elrea_clusters"]["members"].values()) == 100
    assert -1 <= results.elrea.adjusted_rand <= 1
    ensemble = results.row("ELREA, all members", "ELREA").summary()
    assert ensemble["train_em"] > 0.8  # the ensemble of base adapter and experts learned the tasks
    elrea_row = next(row for row in saved["rows"] if row["method"] == "ELREA, all members")
    for task in elrea_row["tasks"]:  # routing diagnostics: the heaviest member, per layer
        for layer in task["routing"].values():
            assert sum(layer["top1"].values()) == pytest.approx(1.0)
    assert results.row("ELREA, top-1", "ELREA").summary()["train_em"] > base["train_em"]


def _result(task, exact_match):
    return TaskResult(task, "numbers", "train", 10, exact_match, exact_match, 1.0)


def test_gates_stop_the_run_with_an_error_that_names_them():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(model_config(tokenizer, hidden=32, layers=1, mlp=64)).eval()
    with pytest.raises(TrainingError, match="gate 'base copies' failed"):
        check_base(untrained, tokenizer, gate=0.95, examples=5)
    weak = Evaluation([_result("numbers-each", 1.0), _result("numbers-last", 0.5)])
    with pytest.raises(TrainingError, match="gate 'private experts' failed: numbers-last") as info:
        check_experts(weak, gate=0.9)
    assert info.value.expert == "numbers-last"
    check_experts(weak, gate=0.5)  # passes


def test_unknown_task_names_fail_before_any_training():
    with pytest.raises(InvalidInputError, match="numbers-backwards"):
        RunConfig(tasks=("numbers-each", "numbers-backwards"))
    with pytest.raises(InvalidInputError, match="nope"):
        RunConfig.reduced(held_out=("nope",))
    with pytest.raises(InvalidInputError, match="unknown backend 'dask'"):
        RunConfig(backend="dask")
    with pytest.raises(InvalidInputError, match="threads must be at least 1"):
        RunConfig(threads=0)


def test_an_elrea_expert_serves_the_designed_cluster_of_most_of_its_examples():
    tasks = get_tasks(("numbers-each", "numbers-last", "words-each", "words-last"))
    clusters = ElreaClusters(
        {
            "cluster-0": {"numbers-each": 50, "words-each": 50},  # one format of both: none
            "cluster-1": {"numbers-last": 45, "words-last": 5, "numbers-each": 50},
        },
        adjusted_rand=0.0,
    )
    assert clusters.expert_clusters(tasks) == {"cluster-1": "numbers"}
