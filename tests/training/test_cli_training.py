"""``quiver train``, ``quiver library cluster`` and ``quiver library build-mbc``."""

import json
from pathlib import Path

import pytest
from training_helpers import pairs, planted_experts, write_jsonl
from typer.testing import CliRunner

from quiver.cli import app
from quiver.registry import Library, LocalRegistry


def quiver(*args) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def quiver_error(*args) -> str:
    """Run a command that must fail; return its one line of error."""
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    return result.stderr


@pytest.fixture
def planted_store(model, tmp_path):
    """A local store with a library of 3 x 2 planted experts, each in its own repo."""
    paths, _ = planted_experts(model, tmp_path / "peft", groups=3, per_group=2)
    registry = LocalRegistry(tmp_path / "store")
    library = Library.create(registry, "me/planted", base_model=model.name_or_path)
    for name, folder in paths.items():
        library.add(registry.push(folder, f"me/{name}"))
    return tmp_path / "store"


def test_train_writes_and_pushes_an_expert(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    records = [{"prompt": p, "response": r} for p, r in pairs("upper")]
    data = write_jsonl(tmp_path / "upper.jsonl", records)
    held_out = write_jsonl(tmp_path / "held.jsonl", records[:3])
    out = quiver(
        "train", data, "--base-model", tmp_path / "base", "-o", tmp_path / "expert",
        "--eval-data", held_out, "--max-steps", 6, "--learning-rate", 1e-2, "--no-progress",
        "--push", "me/upper", "-r", tmp_path / "store",
    )  # fmt: skip
    assert Path(out.strip().splitlines()[-1]) == tmp_path / "expert"
    card = LocalRegistry(tmp_path / "store").pull("me/upper").card
    assert (card.tasks, card.steps, card.examples) == (["upper"], 6, 10)
    assert {r.metric_type for r in card.eval_results} == {"loss", "token_accuracy"}


def test_train_checks_where_it_pushes_before_training(tmp_path, monkeypatch):
    import quiver.training

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the push target")

    monkeypatch.setattr(quiver.training, "train_expert", no_training)
    data = write_jsonl(tmp_path / "upper.jsonl", [{"prompt": "a", "response": "b"}])
    train = ("train", data, "--base-model", "x/y", "-o", tmp_path / "expert")
    assert "invalid repo id 'upper'" in quiver_error(*train, "--push", "upper")
    dead = "http://127.0.0.1:9"  # the discard port: nobody answers
    assert "no access token" in quiver_error(*train, "--push", "me/upper", "-r", dead)
    with_token = ("--push", "me/upper", "-r", dead, "--token", "hf_" + "0" * 40)
    assert "cannot reach" in quiver_error(*train, *with_token)


def test_cluster_prints_json_and_plots(planted_store, tmp_path):
    out = quiver(
        "library", "cluster", "me/planted", "--method", "mbc", "--k", 3, "--json",
        "--plot", tmp_path / "mbc.png", "-r", planted_store,
    )  # fmt: skip
    assert json.loads(out) == {f"cluster-{g}": [f"me/g{g}-e0", f"me/g{g}-e1"] for g in range(3)}
    assert (tmp_path / "mbc.png").read_bytes()[:4] == b"\x89PNG"
    table = quiver(
        "library", "cluster", "me/planted", "--embedding", "parameters", "-r", planted_store
    )
    assert "k=3 (parameters)" in table and "me/g2-e0, me/g2-e1" in table


def test_build_mbc_publishes_a_merged_library_to_another_registry(planted_store, tmp_path):
    out = quiver(
        "library", "build-mbc", "me/planted", "me/mbc", "--k", 3, "--from", planted_store,
        "-r", tmp_path / "other",
    )  # fmt: skip
    assert "3 cluster experts (merged (svd))" in " ".join(out.split())  # rich wraps lines
    library = Library.pull(LocalRegistry(tmp_path / "other"), "me/mbc")
    assert library.names == ["cluster-0", "cluster-1", "cluster-2"]
    assert library.manifest.build["clusters"]["cluster-0"] == ["me/g0-e0", "me/g0-e1"]
    bad_data = quiver_error(
        "library", "build-mbc", "me/planted", "me/x", "--k", 2, "--data", "oops",
        "-r", planted_store,
    )  # fmt: skip
    assert "--data 'oops' is not TASK=FILE" in bad_data
    twice = quiver_error(
        "library", "build-mbc", "me/planted", "me/x", "--k", 2, "--data", "g0-e0=a.jsonl",
        "--data", "g0-e0=b.jsonl", "-r", planted_store,
    )  # fmt: skip
    assert "names the task 'g0-e0' twice (a.jsonl and b.jsonl)" in " ".join(twice.split())
    too_many = quiver_error(
        "library", "build-mbc", "me/planted", "me/x", "--k", 7, "-r", planted_store
    )
    assert "cannot make 7 clusters of 6 experts" in too_many
