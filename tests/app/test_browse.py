"""The Registry tab's card preview reads broken repos as the registry does: a typed error naming
the repo, never a raw decoding error; a library's summary shows its routing advice."""

import pytest

from quiver.app.browse import card_markdown, library_markdown
from quiver.errors import CardError, InvalidAdapterError


def _raw_repo(registry, tmp_path, repo_id: str, files: dict[str, bytes]) -> None:
    folder = tmp_path / repo_id.replace("/", "--")
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    registry.upload(repo_id, folder, message="pushed by a plain client")


def test_a_broken_card_or_config_is_a_typed_error_naming_the_repo(local_registry, tmp_path):
    config = b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'
    _raw_repo(
        local_registry,
        tmp_path,
        "acme/latin1-card",
        {
            "adapter_config.json": config,
            "README.md": "---\nlicense: mit\n---\ncaf\xe9".encode("latin-1"),
        },
    )
    with pytest.raises(CardError, match=r"acme/latin1-card@\w+: README\.md is not UTF-8"):
        card_markdown(local_registry, "acme/latin1-card")

    _raw_repo(local_registry, tmp_path, "acme/bad-config", {"adapter_config.json": b"{not json"})
    with pytest.raises(InvalidAdapterError, match="acme/bad-config@"):
        card_markdown(local_registry, "acme/bad-config")


def test_a_repo_that_is_not_an_expert_shows_its_readme_even_if_not_utf8(local_registry, tmp_path):
    _raw_repo(local_registry, tmp_path, "acme/notes", {"README.md": b"caf\xe9 notes"})
    text = card_markdown(local_registry, "acme/notes")
    assert "Not an expert or a library" in text and "caf\ufffd notes" in text


def test_a_librarys_summary_shows_its_routing_advice(engine):
    text = library_markdown(engine.library)  # the demo library, which carries advice

    assert '- **Routing advice, arrow**: granularity `"sequence"`, prompt_layers `[0]`' in text
    assert '- **Routing advice, elrea**: library `"quiver-demo/toyworld-elrea"`' in text
