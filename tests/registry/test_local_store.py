"""Experts in the local folder store: cards, round trips, versions, search, and refused input."""

import errno
import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from registry_helpers import gsm8k_result, ia3_config, logits, store_state
from safetensors.torch import load_file, save_file

from quiver.errors import (
    CardError,
    ConflictError,
    IntegrityError,
    InvalidAdapterError,
    NotFoundError,
    QuiverError,
)
from quiver.registry import Expert, LocalRegistry
from quiver.store import StorageFullError
from quiver.store.blobs import BlobWriter
from quiver.testing import tiny_model


def test_card_carries_hub_conventions_and_quiver_section(local, make_expert):
    expert = Expert.from_folder(
        make_expert(),
        tasks=["math", "arithmetic"],
        examples=1200,
        steps=300,
        datasets=["gsm8k"],
        license="apache-2.0",
        eval_results=[gsm8k_result()],
        description="Adds two numbers.",
    )
    published = local.push(expert, "alice/math")

    card = ModelCard.load(local.download("alice/math")[0] / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "quiver-testing/tiny-llama"
    assert data["library_name"] == "peft"
    assert "base_model:adapter:quiver-testing/tiny-llama" in data["tags"]
    assert {"task:math", "task:arithmetic"} <= set(data["tags"])
    assert data["datasets"] == ["gsm8k"]
    assert data["license"] == "apache-2.0"
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.42
    assert data["quiver"]["tasks"] == ["math", "arithmetic"]
    training = data["quiver"]["training"]
    assert training == {
        "examples": 1200,
        "steps": 300,
        "rank": 4,
        "alpha": 16.0,
        "target_modules": sorted(expert.config["target_modules"]),
    }
    assert data["quiver"]["hashes"] == published.file_hashes()
    assert set(published.file_hashes()) == {"adapter_config.json", "adapter_model.safetensors"}

    pulled = local.pull("alice/math")
    assert pulled.card.tasks == ["math", "arithmetic"]
    assert pulled.card.eval_results[0].metric_value == 0.42
    assert pulled.card.tags == []  # derived tags are not duplicated into the user's tags
    assert (pulled.card.datasets, pulled.card.license) == (["gsm8k"], "apache-2.0")
    assert (pulled.card.examples, pulled.card.steps) == (1200, 300)
    assert pulled.card.description == "Adds two numbers."
    assert pulled.card.library is None and "library" not in data["quiver"]
    assert pulled.commit == published.commit


def test_quiver_push_loads_with_plain_peft_with_same_logits(local, make_expert, base_model):
    folder = make_expert()
    local.push(folder, "alice/expert")
    snapshot, _ = local.download("alice/expert")

    ours = PeftModel.from_pretrained(tiny_model("llama"), str(snapshot)).eval()
    reference = PeftModel.from_pretrained(tiny_model("llama"), str(folder)).eval()
    assert not logits(base_model).allclose(logits(reference))  # the expert does something
    assert logits(ours).equal(logits(reference))


def test_plain_peft_adapter_gets_its_card_completed(local, tmp_path, base_model):
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(tiny_model("llama"), config).eval()
    model.save_pretrained(tmp_path / "plain")  # PEFT writes its own README without quiver data
    local.push(tmp_path / "plain", "bob/plain")
    pulled = local.pull("bob/plain")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(pulled.path)).eval()
    assert not logits(model).allclose(logits(base_model))  # the adapter does something
    assert logits(loaded).equal(logits(model))
    assert (pulled.card.rank, pulled.card.alpha) == (2, 4.0)
    assert pulled.card.target_modules == ["q_proj", "v_proj"]
    assert pulled.card.base_model == "quiver-testing/tiny-llama"
    assert local.search(base_model="quiver-testing/tiny-llama")[0].repo_id == "bob/plain"


def test_pull_by_branch_tag_and_commit(local, make_expert):
    first = local.push(make_expert(seed=1), "alice/e", tag="v1")
    second = local.push(make_expert(seed=2), "alice/e")
    on_branch = local.push(make_expert(seed=3), "alice/e", branch="dev")

    assert local.pull("alice/e").weights_sha256 == second.weights_sha256
    assert local.pull("alice/e", revision="v1").weights_sha256 == first.weights_sha256
    assert local.pull("alice/e", revision="dev").weights_sha256 == on_branch.weights_sha256
    by_commit = local.pull("alice/e", revision=first.commit[:10])
    assert by_commit.weights_sha256 == first.weights_sha256
    assert by_commit.commit == first.commit

    history = local.versions("alice/e")
    assert [v.commit for v in history] == [second.commit, first.commit]
    assert history[1].refs == ("v1",)
    assert local.versions("alice/e", branch="dev")[0].commit == on_branch.commit


def test_search_filters(local, make_expert):
    local.push(Expert.from_folder(make_expert(), tasks=["math"], tags=["fast"]), "alice/math")
    local.push(Expert.from_folder(make_expert(), tasks=["code"]), "alice/code")
    described = Expert.from_folder(make_expert(), tasks=["math"], description="Algebra: 100%")
    local.push(described, "bob/algebra")
    phi = tiny_model("phi")
    other = Expert.from_folder(make_expert_for(phi, local.root.parent / "phi"), tasks=["math"])
    local.push(other, "carol/phi-math")

    def ids(**filters):
        return sorted(hit.repo_id for hit in local.search(**filters))

    assert ids(task="math") == ["alice/math", "bob/algebra", "carol/phi-math"]
    assert ids(task="math", base_model="quiver-testing/tiny-llama") == ["alice/math", "bob/algebra"]
    assert ids(tag="fast") == ["alice/math"]
    assert ids(author="alice") == ["alice/code", "alice/math"]
    assert ids(query="ALGEBRA: 100") == ["bob/algebra"]  # free text, case-insensitive
    assert ids(query="%") == ["bob/algebra"]  # LIKE wildcards are literal
    assert ids(query="phi-") == ["carol/phi-math"]
    assert ids(kind="library") == []
    assert len(local.list()) == 4
    assert [hit.repo_id for hit in local.list(author="bob")] == ["bob/algebra"]
    assert len(local.list(limit=3)) == 3
    assert local.search(author="alice", task="code")[0].tasks == ("code",)


def make_expert_for(model, path):
    from quiver.testing import make_random_expert

    return make_random_expert(model, path, rank=4)


def test_delete_removes_repo_and_its_snapshots(local, make_expert):
    published = local.push(make_expert(), "alice/gone")
    local.delete("alice/gone")
    assert local.list() == []
    assert not (local.root / "snapshots" / published.commit).exists()
    with pytest.raises(NotFoundError):
        local.pull("alice/gone")
    with pytest.raises(NotFoundError, match="no repo 'alice/gone'"):
        local.delete("alice/gone")


def test_unknown_repo_and_revision(local, make_expert):
    local.push(make_expert(), "alice/e")
    with pytest.raises(NotFoundError, match="no repo 'alice/nope'"):
        local.pull("alice/nope")
    with pytest.raises(NotFoundError, match="no revision 'v9'") as error:
        local.pull("alice/e", revision="v9")
    assert "main" in error.value.hint
    with pytest.raises(QuiverError, match="invalid repo id"):
        local.pull("../../etc")


def _ia3_folder(tmp_path):
    get_peft_model(tiny_model("llama"), ia3_config()).save_pretrained(tmp_path / "ia3")
    return tmp_path / "ia3"


def _truncate(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return folder


def _pickle_beside(folder):
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    return folder


def _without_weights(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return folder


def _malformed_card(folder):
    (folder / "README.md").write_text("---\nbase_model: [unclosed\n---\n# card\n")
    return folder


def _bad_quiver_section(folder):
    (folder / "README.md").write_text("---\nquiver:\n  tasks: math\n---\n")
    return folder


def _card(content: bytes):
    def spoil(folder):
        (folder / "README.md").write_bytes(content)
        return folder

    return spoil


def _tampered(folder):
    """A card that pins hashes, then weights that changed after it was written."""
    Expert.from_folder(folder).save(folder)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return folder


def _missing_config(folder):
    (folder / "adapter_config.json").unlink()
    return folder


@pytest.mark.parametrize(
    ("spoil", "error", "message"),
    [
        (None, InvalidAdapterError, "IA3 adapter, not a LoRA"),
        ({"use_dora": True}, InvalidAdapterError, "DoRA"),
        (_pickle_beside, InvalidAdapterError, "pickle files"),
        (_without_weights, InvalidAdapterError, "never unpickles"),
        (_truncate, IntegrityError, "not a readable safetensors"),
        (_tampered, IntegrityError, "does not match its pinned sha256"),
        (_malformed_card, CardError, "malformed model card YAML"),
        (_bad_quiver_section, CardError, "quiver.tasks"),
        (_card(b"---\nquiver:\n  training: {hyperparameters: 5}\n---\n"), CardError, "hyperp"),
        (_card(b"---\ntags: [[math]]\n---\n"), CardError, "tags must be a string or a list"),
        (_card(b"---\na: &a [x, x]\nb: *a\n---\n"), CardError, r"aliases \(\*name\) are not"),
        (_card(b"\xff\xfe---\n"), CardError, "README.md is not UTF-8 text"),
        (_missing_config, InvalidAdapterError, "no adapter_config.json"),
    ],
    ids=[
        "ia3",
        "dora",
        "pickle",
        "bin-only",
        "truncated",
        "tampered",
        "yaml",
        "section",
        "types",
        "tags",
        "aliases",
        "not-utf8",
        "config",
    ],
)
def test_bad_adapters_are_refused_and_nothing_lands(
    local, make_expert, tmp_path, spoil, error, message
):
    local.push(make_expert(), "alice/good")
    before = store_state(local)
    if spoil is None:
        folder = _ia3_folder(tmp_path)
    elif isinstance(spoil, dict):
        folder = make_expert(**spoil)
    else:
        folder = spoil(make_expert())
    with pytest.raises(error, match=message) as raised:
        local.push(folder, "alice/bad")
    assert raised.value.hint and "\n" not in str(raised.value)
    assert store_state(local) == before
    assert not any((local.root / "tmp").iterdir())


def test_tampered_store_blob_is_caught_on_pull(local, make_expert):
    local.push(make_expert(), "alice/e")
    weights = local.download("alice/e")[0] / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors"):
        local.pull("alice/e")
    with pytest.raises(IntegrityError):  # the blob itself is damaged: pulling cannot repair it
        local.pull("alice/e")


def test_a_damaged_snapshot_is_made_anew_by_the_next_pull(local, make_expert):
    """A snapshot folder is links to the blobs: one whose files were deleted or replaced fails
    verification once, and the next pull, as the error says, gets the stored bytes."""
    pushed = local.push(make_expert(), "alice/e")
    snapshot = local.pull("alice/e").path
    (snapshot / "adapter_model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="pull it again"):
        local.pull("alice/e")
    assert local.pull("alice/e").weights_sha256 == pushed.weights_sha256


def test_store_files_are_read_only_and_shared(local, make_expert):
    folder = make_expert()
    first = local.push(folder, "alice/a")
    second = local.push(folder, "alice/b")
    a = local.download("alice/a")[0] / "adapter_model.safetensors"
    b = local.download("alice/b")[0] / "adapter_model.safetensors"
    assert a.parent.name == first.commit and b.parent.name == second.commit
    assert a.stat().st_ino == b.stat().st_ino  # one blob, hard-linked
    assert not a.stat().st_mode & 0o222


def test_missing_folder_and_default_home(tmp_path, monkeypatch, make_expert):
    with pytest.raises(NotFoundError):
        Expert.from_folder(tmp_path / "nothing")
    monkeypatch.setenv("QUIVER_HOME", str(tmp_path / "home"))
    registry = LocalRegistry()
    assert registry.root == tmp_path / "home" / "registry"
    registry.push(make_expert(), "alice/e")
    assert json.loads((registry.download("alice/e")[0] / "adapter_config.json").read_text())
    shutil.rmtree(tmp_path / "home")


def test_pushing_unchanged_files_makes_no_new_version(local, make_expert):
    folder = make_expert()
    first = local.push(folder, "alice/e")
    again = local.push(folder, "alice/e", tag="same")
    assert again.commit == first.commit
    assert [(v.commit, v.refs) for v in local.versions("alice/e")] == [
        (first.commit, ("main", "same"))
    ]


def test_tags_are_immutable_and_checked_before_pushing(local, make_expert):
    local.push(make_expert(), "alice/e", tag="v1")
    before = store_state(local)
    with pytest.raises(ConflictError, match="'v1'"):
        local.push(make_expert(), "alice/e", tag="v1")
    with pytest.raises(ConflictError, match="'main'"):
        local.tag("alice/e", "main", revision="v1")
    assert store_state(local) == before
    assert local.refs("alice/e") == {"main": before[0]["alice/e"][0], "v1": before[0]["alice/e"][0]}


def test_bf16_expert_round_trips_with_same_logits(local, make_expert):
    folder = make_expert()
    weights = folder / "adapter_model.safetensors"
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    local.push(folder, "alice/bf16")
    pulled = local.pull("alice/bf16")
    pulled_tensors = load_file(pulled.path / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in pulled_tensors.values()} == {torch.bfloat16}

    def load(path):
        return PeftModel.from_pretrained(tiny_model("llama", dtype=torch.bfloat16), str(path))

    assert logits(load(pulled.path).eval()).equal(logits(load(folder).eval()))


def test_a_push_that_fails_midway_leaves_nothing(local, make_expert, monkeypatch):
    local.push(make_expert(), "alice/good")
    before = store_state(local)
    real_write = BlobWriter.write
    calls = []

    def write_then_fail(self, chunk):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, chunk)

    monkeypatch.setattr(BlobWriter, "write", write_then_fail)
    with pytest.raises(StorageFullError, match="no space left on the disk of the store"):
        local.push(make_expert(), "alice/half")
    assert len(calls) == 2
    assert store_state(local) == before
    assert not any((local.root / "tmp").iterdir())
