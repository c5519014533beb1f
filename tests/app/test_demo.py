"""The embedded default: the demo library is installed once, offline, and repaired if cut short."""

from quiver.app.demo import DEMO_BASE_MODEL, DEMO_EXPERTS, DEMO_LIBRARY, ensure_demo_library
from quiver.registry import Library, LocalRegistry
from quiver.routing.arrow import ARTIFACT_NAME


def test_installed_once_with_experts_prototypes_and_base_model(tmp_path):
    registry = LocalRegistry(tmp_path / "store")

    assert ensure_demo_library(registry) == DEMO_LIBRARY
    versions = len(registry.versions(DEMO_LIBRARY))
    assert ensure_demo_library(registry) == DEMO_LIBRARY
    assert len(registry.versions(DEMO_LIBRARY)) == versions  # the second call wrote nothing

    library = Library.open(registry, DEMO_LIBRARY)
    assert library.names == list(DEMO_EXPERTS)
    assert library.manifest.base_model == DEMO_BASE_MODEL
    assert ARTIFACT_NAME in library.manifest.artifacts
    experts = {hit.repo_id for hit in registry.search(kind="expert", task="demo")}
    assert experts == {f"quiver-demo/{name}" for name in DEMO_EXPERTS}
    folder, _ = registry.download(DEMO_BASE_MODEL)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_an_install_cut_short_is_done_again(tmp_path):
    registry = LocalRegistry(tmp_path / "store")
    Library.create(registry, DEMO_LIBRARY, base_model=DEMO_BASE_MODEL)  # experts never added

    ensure_demo_library(registry)

    library = Library.open(registry, DEMO_LIBRARY)
    assert library.names == list(DEMO_EXPERTS)
    assert ARTIFACT_NAME in library.manifest.artifacts
