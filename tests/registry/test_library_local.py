"""Libraries in the local store: pinning, versions, artifacts, verified pulls, refused experts."""

import json
import os
import shutil
import threading

import pytest
import torch
from huggingface_hub import ModelCard
from peft import ArrowConfig, PeftModel
from peft.tuners.lora import create_arrow_model
from registry_helpers import logits, store_state
from safetensors.torch import save_file
from typer.testing import CliRunner

from quiver.cli import app
from quiver.errors import (
    CardError,
    IncompatibleExpertError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    QuiverError,
)
from quiver.registry import Expert, Library, LocalRegistry
from quiver.testing import tiny_model

BASE = "quiver-testing/tiny-llama"


@pytest.fixture
def library(local, make_expert):
    """A library with one referenced expert ('math', published first) and one bundled ('code')."""
    local.push(Expert.from_folder(make_expert("math"), tasks=["math"]), "alice/math")
    library = Library.create(local, "alice/lib", base_model=BASE, description="Two skills.")
    library.add("alice/math")
    library.add(make_expert("code"))
    return library


def test_manifest_pins_every_expert(library, local):
    math, code = library.experts
    assert (math.name, math.repo_id, math.bundled) == ("math", "alice/math", False)
    assert math.commit == local.pull("alice/math").commit
    assert math.sha256 == local.pull("alice/math").weights_sha256
    assert (code.name, code.bundled, code.commit) == ("code", True, None)
    manifest = json.loads((library.folder / "library.json").read_text())
    assert manifest["format"] == "quiver-library/1"
    assert [e["name"] for e in manifest["experts"]] == ["math", "code"]
    assert manifest["rank"] == 4
    assert "routing" not in manifest  # no advice, no key: older Quiver reads it
    card = ModelCard.load(library.folder / "README.md")
    assert card.data.base_model == BASE
    assert {"quiver-library", f"base_model:adapter:{BASE}"} <= set(card.data.tags)
    assert card.data.to_dict()["quiver"]["library"]["experts"] == ["math", "code"]
    assert math.sha256[:16] in card.text and code.sha256[:16] in card.text
    snapshot, _ = local.download("alice/lib")
    bundled = Expert.from_folder(snapshot / "experts" / "code")
    assert bundled.card.library == "alice/lib"
    assert bundled.weights_sha256 == code.sha256


def test_every_change_is_a_new_version(library, local, make_expert, tmp_path):
    assert len(library.versions()) == 3  # create, add math, add code
    first = library.versions()[-1].commit
    library.remove("math")
    prototypes = tmp_path / "prototypes.safetensors"
    save_file({"code": torch.ones(2, 3)}, prototypes)
    library.add_artifact("arrow_prototypes", prototypes)
    assert [v.message for v in library.versions()[:2]] == [
        "Add artifact arrow_prototypes",
        "Remove expert math",
    ]
    assert Library.open(local, "alice/lib", revision=first).names == []
    before_removal = library.versions()[2].commit
    assert Library.open(local, "alice/lib", revision=before_removal).names == ["math", "code"]
    reopened = Library.pull(local, "alice/lib")
    assert reopened.names == ["code"]
    assert reopened.artifact_path("arrow_prototypes").read_bytes() == prototypes.read_bytes()
    assert reopened.artifact_path("nothing") is None
    assert reopened.commit == library.commit


def test_pull_gives_expert_paths_in_manifest_order(library, local):
    pulled = Library.pull(local, "alice/lib")
    paths = pulled.expert_paths()
    assert list(paths) == ["math", "code"]
    model = PeftModel.from_pretrained(tiny_model("llama"), str(paths["math"])).eval()
    reference = PeftModel.from_pretrained(
        tiny_model("llama"), str(local.download("alice/math")[0])
    ).eval()
    assert logits(model).equal(logits(reference))


def test_arrow_loads_bundled_and_referenced_experts(library, local):
    paths = Library.pull(local, "alice/lib").expert_paths()
    model = create_arrow_model(
        tiny_model("llama"),
        task_specific_adapter_paths=[str(p) for p in paths.values()],
        arrow_config=ArrowConfig(top_k=1, router_temperature=1.0),
    )
    assert logits(model).isfinite().all()


def test_tampered_or_truncated_expert_is_caught_on_pull(library, local):
    math = library.experts[0]
    weights = local.download("alice/math", revision=math.commit)[0] / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.chmod(0o644)
    weights.write_bytes(original[:-64])
    with pytest.raises(IntegrityError, match="sha256"):
        Library.pull(local, "alice/lib")
    # A card that agrees with tampered weights does not help: the manifest pins them too.
    snapshot = local.download("alice/math", revision=math.commit)[0]  # linked anew: same blob
    (snapshot / "adapter_model.safetensors").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    (snapshot / "README.md").chmod(0o644)
    (snapshot / "README.md").write_text("---\nbase_model: quiver-testing/tiny-llama\n---\n")
    with pytest.raises(IntegrityError, match="expert 'math'"):
        Library.pull(local, "alice/lib")


def test_tampered_artifact_is_caught_on_open(library, local, tmp_path):
    save_file({"p": torch.zeros(2)}, tmp_path / "a.safetensors")
    library.add_artifact("arrow_prototypes", tmp_path / "a.safetensors")
    artifact = library.artifact_path("arrow_prototypes")
    artifact.chmod(0o644)
    artifact.write_bytes(artifact.read_bytes()[:-2])
    with pytest.raises(IntegrityError, match="arrow_prototypes"):
        Library.open(local, "alice/lib")


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"rank": 8}, "rank"),
        ({"target_modules": ("q_proj", "v_proj")}, "target modules"),
        ({"base_model_name_or_path": "someone/else"}, "base model"),
    ],
)
def test_incompatible_experts_are_refused(library, local, make_expert, change, what):
    before = store_state(local)
    config_changes = {k: v for k, v in change.items() if k == "base_model_name_or_path"}
    folder = make_expert(
        rank=change.get("rank", 4), target_modules=change.get("target_modules"), **config_changes
    )
    with pytest.raises(IncompatibleExpertError, match=what):
        library.add(folder)
    assert store_state(local) == before
    assert Library.open(local, "alice/lib").names == ["math", "code"]


def test_name_clash_unknown_expert_and_malformed_manifest(library, local, make_expert, tmp_path):
    with pytest.raises(QuiverError, match="already has an expert named 'code'"):
        library.add(make_expert("code"))
    with pytest.raises(NotFoundError, match="no expert 'nope'"):
        library.remove("nope")
    before = store_state(local)
    with pytest.raises(NotFoundError, match="no revision 'v9'"):
        library.add("alice/math@v9")
    with pytest.raises(NotFoundError, match="no repo 'alice/nope'"):
        library.add("alice/nope")
    assert store_state(local) == before
    with pytest.raises(NotFoundError, match="not a Quiver library"):
        Library.open(local, "alice/math")
    with pytest.raises(NotFoundError):
        Library.pull(local, "alice/nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "library.json").write_text('{"format": "quiver-library/1", "name": 3}')
    local.upload("alice/broken", bad, message="broken")
    with pytest.raises(CardError, match=r"malformed library\.json"):
        Library.open(local, "alice/broken")
    before = store_state(local)
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    for artifact in (tmp_path / "fifo", tmp_path):
        with pytest.raises(InvalidInputError, match="is not a regular file"):
            library.add_artifact("prototypes", artifact)
    assert store_state(local) == before


def test_push_library_to_another_registry_copies_referenced_experts(library, tmp_path):
    other = LocalRegistry(tmp_path / "other")
    report = library.push(other)
    pushed = report.library
    assert (report.pushed, report.already_there) == (("alice/math",), ())
    assert pushed.registry is other
    assert [pin.sha256 for pin in pushed.experts] == [pin.sha256 for pin in library.experts]
    assert pushed.experts[0].commit == other.pull("alice/math").commit
    pulled = Library.pull(other, "alice/lib")
    assert list(pulled.expert_paths()) == ["math", "code"]
    assert {hit.repo_id for hit in other.search(kind="library")} == {"alice/lib"}
    assert {hit.repo_id for hit in other.search(kind="library", base_model=BASE)} == {"alice/lib"}
    # Pushing again reuses the experts already there.
    again = library.push(other)
    assert (again.pushed, again.already_there) == ((), ("alice/math",))
    assert again.library.experts[0].commit == pushed.experts[0].commit


def test_create_refuses_an_existing_library(library, local):
    with pytest.raises(QuiverError, match="already exists"):
        Library.create(local, "alice/lib", base_model=BASE)


def test_experts_download_concurrently(library, local, monkeypatch):
    opened = Library.open(local, "alice/lib")
    both_in_flight = threading.Barrier(len(opened.experts), timeout=10)
    download = local.download

    def download_when_all_started(repo_id, **kwargs):
        both_in_flight.wait()  # breaks (BrokenBarrierError) unless the downloads overlap
        return download(repo_id, **kwargs)

    monkeypatch.setattr(local, "download", download_when_all_started)
    assert list(opened.fetch(max_workers=len(opened.experts))) == ["math", "code"]


def test_a_referenced_expert_stays_pinned_when_its_repo_moves_on(library, local, make_expert):
    pinned = library.experts[0]
    newer = local.push(make_expert("math-v2"), "alice/math")
    assert newer.weights_sha256 != pinned.sha256
    pulled = Library.pull(local, "alice/lib").fetch()["math"]
    assert (pulled.commit, pulled.weights_sha256) == (pinned.commit, pinned.sha256)


def test_a_bundled_expert_missing_from_the_snapshot_is_refused(library, local, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(local.download("alice/lib")[0], copy)
    shutil.rmtree(copy / "experts" / "code")
    local.upload("alice/lib", copy, message="lose the bundled expert's files")
    opened = Library.open(local, "alice/lib")
    with pytest.raises(NotFoundError, match="no experts/code/ folder") as error:
        opened.fetch()
    assert "versions" in error.value.hint


def _manifest(**changes) -> bytes:
    pin = {"name": "m", "sha256": "a" * 64, "repo_id": "alice/math", "commit": "b" * 40}
    pin.update(changes.pop("pin", {}))
    manifest = {"format": "quiver-library/1", "name": "alice/bad", "base_model": BASE}
    return json.dumps({**manifest, "experts": [pin], **changes}).encode()


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        (b"[]", "it is not a JSON object"),
        (b'{"format": "quiver-library/1"}', "experts is not a list of objects"),
        (b'{"format": "\xff"}', "can't decode byte 0xff"),
        (b"[" * 100_000, "recursion"),
        (_manifest(pin={"commit": 5}), "expert 'm': commit 5 does not fit repo_id 'alice/math'"),
        (_manifest(pin={"commit": None}), "expert 'm': commit None does not fit"),
        (_manifest(pin={"repo_id": "../x"}), "invalid repo id '../x'"),
        (_manifest(artifacts={"../../x": "a" * 64}), "invalid artifact name '../../x'"),
        (_manifest(base_model=5), "base_model must be a model id"),
        (_manifest(rank="8"), "rank must be a positive integer"),
        (_manifest(routing={"arrow": 1}), "routing must map strategy names to mappings"),
    ],
)
def test_a_malformed_manifest_is_one_line_and_never_followed(local, tmp_path, manifest, problem):
    """library.json is checked whole before anything in it is used (paths, repos, commits)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "library.json").write_bytes(manifest)
    local.upload("alice/bad", folder, message="a broken manifest")
    result = CliRunner().invoke(app, ["library", "pull", "alice/bad", "-r", str(local.root)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith("error: malformed library.json in alice/bad@")
    assert problem in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_routing_advice_is_a_new_version_kept_in_manifest_and_card(library, local):
    before = library.commit
    advice = {"arrow": {"granularity": "sequence", "prompt_layers": (0,)}}
    library.set_routing(advice, message="route by the first block")

    assert library.commit != before and library.versions()[0].message == "route by the first block"
    reopened = Library.open(local, "alice/lib")
    assert reopened.manifest.routing == {"arrow": {"granularity": "sequence", "prompt_layers": [0]}}
    assert reopened.names == ["math", "code"]  # the experts and their pins are kept
    card = ModelCard.load(reopened.folder / "README.md")
    assert card.data.to_dict()["quiver"]["library"]["routing"] == reopened.manifest.routing
    assert Library.open(local, "alice/lib", revision=before).manifest.routing is None
    assert library.set_routing(None).manifest.routing is None


def test_the_cli_sets_shows_and_refuses_routing_advice(library, local):
    where = ["-r", str(local.root)]
    advice = '{"arrow": {"granularity": "sequence", "prompt_layers": [0]}}'
    result = CliRunner().invoke(app, ["library", "set-routing", "alice/lib", advice, *where])
    assert result.exit_code == 0, result.output
    assert 'routing advice: {"arrow": {"granularity": "sequence", "prompt_layers": [0]}}' in (
        " ".join(result.stdout.split())
    )
    assert Library.open(local, "alice/lib").manifest.routing == json.loads(advice)
    for bad, problem in [("{arrow", "is not JSON"), ("[1]", "must map strategy names")]:
        result = CliRunner().invoke(app, ["library", "set-routing", "alice/lib", bad, *where])
        assert result.exit_code == 1 and problem in result.stderr, result.output


@pytest.mark.parametrize(
    ("advice", "problem"),
    [
        ({"arrow": ["sequence"]}, "routing must map strategy names to mappings"),
        ({"arrow": {"temperature": float("nan")}}, "routing must hold JSON values"),
        ({"arrow": {"layers": {0, 1}}}, "routing must hold JSON values"),
    ],
)
def test_bad_routing_advice_is_refused_before_any_commit(library, advice, problem):
    versions = len(library.versions())
    with pytest.raises(InvalidInputError, match=problem):
        library.set_routing(advice)
    assert len(library.versions()) == versions


def test_a_deleted_pinned_expert_is_named_with_the_way_out(library, local, tmp_path):
    local.delete("alice/math")
    with pytest.raises(NotFoundError, match=r"alice/lib pins expert 'math' at alice/math@") as gone:
        Library.pull(local, "alice/lib")
    assert gone.value.expert == "math" and "quiver library remove alice/lib math" in gone.value.hint
    assert list(library.remove("math").expert_paths()) == ["code"]
    # An expert of another registry is never pinned here, where its commit does not exist.
    elsewhere = LocalRegistry(tmp_path / "elsewhere")
    foreign = elsewhere.push(library.fetch()["code"], "bob/code")
    with pytest.raises(NotFoundError, match=r"bob/code@\w+ is not in .*, where alice/lib lives"):
        library.add(foreign)
    assert library.add(foreign, name="bobs-code", bundle=True).experts[-1].bundled


def test_create_with_experts_is_one_version_checked_before_anything_is_written(
    local, make_expert, tmp_path
):
    """A builder publishes a whole library at once: every expert and artifact is checked first,
    so one that does not fit leaves no repo behind (not an empty or half-built library)."""
    local.push(Expert.from_folder(make_expert("math"), tasks=["math"]), "alice/math")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    refused = {
        "rank": ({"code": make_expert("code"), "wide": make_expert("wide", rank=8)}, {}),
        "artifact": ({"code": make_expert("code2")}, {"arrow_prototypes": junk}),
    }
    for (experts, artifacts), error in zip(
        refused.values(), (IncompatibleExpertError, InvalidInputError), strict=True
    ):
        with pytest.raises(error):
            Library.create(
                local, "alice/lib", base_model=BASE, experts=experts, artifacts=artifacts
            )
        assert local.head("alice/lib") is None
    library = Library.create(
        local,
        "alice/lib",
        base_model=BASE,
        experts={"algebra": "alice/math", "code": make_expert("code3")},
    )
    assert len(library.versions()) == 1
    assert [(pin.name, pin.bundled) for pin in library.experts] == [
        ("algebra", False),
        ("code", True),
    ]
