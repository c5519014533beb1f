"""The contract with routing: a pulled Library is an expert source, with stored Arrow prototypes."""

from registry_helpers import logits

from quiver import Library, route
from quiver.routing import compute_arrow_prototypes, save_prototypes
from quiver.testing import tiny_model


def test_routing_takes_a_pulled_library_and_its_prototypes(local, make_expert, tmp_path):
    library = Library.create(local, "alice/lib", base_model="quiver-testing/tiny-llama")
    for name in ("math", "code", "chat"):
        library.add(make_expert(name))
    prototypes = save_prototypes(compute_arrow_prototypes(library), tmp_path / "p.safetensors")
    library.add_artifact("arrow_prototypes", prototypes)

    pulled = Library.pull(local, "alice/lib")
    assert list(pulled.expert_paths()) == ["math", "code", "chat"]
    stored = pulled.artifact_path("arrow_prototypes")
    assert stored.read_bytes() == prototypes.read_bytes()
    base = tiny_model("llama")
    before = logits(base)
    routed = route(base, pulled, "arrow", top_k=2)
    assert not logits(routed).allclose(before)
