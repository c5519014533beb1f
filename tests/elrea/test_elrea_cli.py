"""``quiver library build-elrea``, and the Ray backend of the build."""

import json

import pytest
import torch
from elrea_helpers import FAST, planted_pairs
from typer.testing import CliRunner

from quiver.cli import app
from quiver.registry import Library, LocalRegistry
from quiver.routing.elrea_artifact import stored_artifact
from quiver.testing import tiny_model
from quiver.training import build_elrea_library


def _invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def test_build_elrea_publishes_a_routable_library(tokenizer, tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    truth = [kind for kind in range(3) for _ in range(8)]
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r}) + "\n" for p, r in planted_pairs(truth, seed=0)
        )
    )
    common = ("--base-model", tmp_path / "base", "-r", tmp_path / "store", "--no-progress")
    result = _invoke(
        "library", "build-elrea", data, "me/cli", "--k", 3, "--max-steps", 6,
        "--learning-rate", 1e-2, "--projection-dim", 128, *common,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "me/cli@" in result.stdout and "elrea artifact attached" in result.stdout
    library = Library.open(LocalRegistry(tmp_path / "store"), "me/cli")
    build = library.manifest.build
    assert (build["k"], build["projection"]["dim"], sum(build["cluster_sizes"].values())) == (
        3, 128, 24,
    )  # fmt: skip
    assert library.names == ["base", "cluster-0", "cluster-1", "cluster-2"]
    assert set(library.manifest.artifacts) == {"elrea"}
    result = _invoke("library", "build-elrea", data, "me/other", "--k", 99, *common)
    assert result.exit_code == 1 and "cannot make 99 clusters of 24 examples" in result.stderr


@pytest.mark.slow
def test_the_ray_backend_builds_the_same_library(tokenizer, tmp_path):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    pairs = planted_pairs([kind for kind in range(3) for _ in range(6)], seed=0)
    common = dict(tokenizer=tokenizer, k=3, config=FAST, projection_dim=128, progress=False)
    registry = LocalRegistry(tmp_path / "store")
    try:
        built = {
            backend: build_elrea_library(
                pairs,
                registry,
                f"me/{backend}",
                base_model=tiny_model(),
                backend=backend,
                num_cpus=2,
                **common,
            )
            for backend in ("local", "ray")
        }
    finally:
        if started_here:
            ray.shutdown()
    local, remote = ({p.name: p.sha256 for p in built[b].experts} for b in ("local", "ray"))
    assert local == remote  # the same seeds give the same experts, bit for bit
    local, remote = (stored_artifact(built[b]) for b in ("local", "ray"))
    assert local.expert_names == remote.expert_names
    torch.testing.assert_close(local.centroids, remote.centroids, atol=1e-6, rtol=0)
