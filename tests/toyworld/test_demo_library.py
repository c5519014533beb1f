"""The prebuilt demo library: shipped in the package, installed offline, atomically, once."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.errors import InvalidInputError, RegistryError
from quiver.registry import Library, LocalRegistry
from quiver.routing import route
from quiver.routing.elrea_artifact import stored_artifact
from quiver.toyworld import (
    CLUSTERS,
    DEMO_BASE_MODEL,
    DEMO_ELREA_LIBRARY,
    DEMO_FOLDER,
    DEMO_LIBRARY,
    TASKS,
    evaluate,
    install_demo,
)
from quiver.toyworld.demo import DEMO_REPOS, MAX_BYTES, _files, export_demo
from quiver.toyworld.pipeline import task_owners


def test_the_demo_ships_in_the_package_within_its_size_budget():
    files = [p for p in DEMO_FOLDER.rglob("*") if p.is_file()]
    assert (DEMO_FOLDER / "base" / "model.safetensors") in files
    assert (DEMO_FOLDER / "library" / "library.json") in files
    assert (DEMO_FOLDER / "elrea" / "library.json") in files
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_install_is_offline_idempotent_and_routes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = LocalRegistry(tmp_path / "store")
    assert install_demo(registry) == DEMO_LIBRARY
    versions = registry.versions(DEMO_LIBRARY), registry.versions(DEMO_BASE_MODEL)
    assert install_demo(registry) == DEMO_LIBRARY  # nothing new is written
    assert (registry.versions(DEMO_LIBRARY), registry.versions(DEMO_BASE_MODEL)) == versions

    library = Library.pull(registry, DEMO_LIBRARY)
    assert library.manifest.base_model == DEMO_BASE_MODEL
    assert library.artifact_path("arrow_prototypes") is not None
    elrea = Library.pull(registry, DEMO_ELREA_LIBRARY)
    assert elrea.manifest.base_model == DEMO_BASE_MODEL
    assert stored_artifact(elrea).base_expert in elrea.names
    folder, _ = registry.download(DEMO_BASE_MODEL)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    owners = task_owners(library)
    tasks = [task for task in TASKS if task.name.endswith("-each")]
    assert {task.cluster for task in tasks} == set(CLUSTERS)
    routed = route(model, library, "oracle")
    own = evaluate(
        routed, tokenizer, tasks, examples=50, oracle={t.name: owners[t.name] for t in tasks}
    )
    assert min(r.exact_match for r in own.results) >= 0.9  # each cluster's expert knows its tasks


def test_a_registry_that_cannot_be_written_gets_a_typed_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QUIVER_HOME", str(blocker / "home"))  # cannot become a folder
    with pytest.raises(RegistryError, match="Not a directory"):
        install_demo()


@pytest.mark.parametrize("failing", [DEMO_LIBRARY, DEMO_ELREA_LIBRARY])
def test_a_failure_half_way_leaves_no_demo_repo_behind(tmp_path, monkeypatch, failing):
    registry = LocalRegistry(tmp_path / "store")
    upload = registry.upload

    def fail_on_the_library(repo_id, folder, **options):
        if repo_id == failing:
            raise OSError(28, "No space left on device")
        return upload(repo_id, folder, **options)

    monkeypatch.setattr(registry, "upload", fail_on_the_library)
    with pytest.raises(RegistryError, match="No space left"):
        install_demo(registry)
    assert registry.list() == []


def test_export_copies_the_three_repos_and_refuses_an_incomplete_set(tmp_path):
    registry = LocalRegistry(tmp_path / "store")
    install_demo(registry)
    output = export_demo(registry, DEMO_REPOS, tmp_path / "demo", say=lambda _: None)
    for name in DEMO_REPOS:
        assert _files(output / name) == _files(DEMO_FOLDER / name)
    partial = {k: v for k, v in DEMO_REPOS.items() if k != "elrea"}
    with pytest.raises(InvalidInputError, match="elrea"):
        export_demo(registry, partial, tmp_path / "other")
    assert not (tmp_path / "other").exists()
