import pytest
import torch
from peft import PeftModel

from quiver.errors import QuiverError
from quiver.testing import ARCHITECTURES, make_random_expert, tiny_model, tiny_tokenizer


def test_tokenizer_round_trips_any_text_offline():
    tokenizer = tiny_tokenizer()
    text = "Reverse 'abc' → cba, ünïcode too!"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < tiny_model("llama").config.vocab_size
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("assistant: ")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_expert_loads_in_plain_peft_and_changes_outputs(arch, tmp_path):
    model = tiny_model(arch)
    inputs = tiny_tokenizer()(["hello world"], return_tensors="pt")
    with torch.no_grad():
        base_logits = model(**inputs).logits
    path = make_random_expert(model, tmp_path / "expert", rank=4, seed=1)

    peft_model = PeftModel.from_pretrained(model, str(path))
    with torch.no_grad():
        expert_logits = peft_model(**inputs).logits
    assert not torch.allclose(base_logits, expert_logits, atol=1e-4)
    loaded = dict(peft_model.named_parameters())
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in loaded.items())


def test_models_are_deterministic_and_take_a_dtype():
    first, second = tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=3)
    assert all(
        torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )
    bf16 = tiny_model("qwen2", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_unknown_architecture_is_a_quiver_error():
    with pytest.raises(QuiverError, match="unknown test architecture"):
        tiny_model("t5")
