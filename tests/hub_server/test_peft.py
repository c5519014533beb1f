"""PEFT and transformers push to the self-hosted Hub and load back, through HF_ENDPOINT only."""

import torch
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.testing import tiny_model, tiny_tokenizer


def test_peft_push_to_hub_and_from_pretrained(hub_server, tmp_path):
    token = hub_server.create_token("peft-user")
    base = tiny_model("llama", seed=0)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero B, so that the adapter really changes the outputs
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
    inputs = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        expected = lora(input_ids=inputs).logits
    lora.push_to_hub("peft-user/tiny-lora", token=token)

    info = HfApi().model_info("peft-user/tiny-lora")
    files = {s.rfilename for s in info.siblings}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    # The card transformers' push_to_hub writes comes back as cardData, its library as a tag.
    assert info.card_data["library_name"] in info.tags

    loaded = PeftModel.from_pretrained(
        tiny_model("llama", seed=0), "peft-user/tiny-lora", cache_dir=tmp_path
    )
    with torch.no_grad():
        actual = loaded(input_ids=inputs).logits
    torch.testing.assert_close(actual, expected)
    with torch.no_grad():
        plain = tiny_model("llama", seed=0)(input_ids=inputs).logits
    assert not torch.allclose(plain, expected)


def test_transformers_push_to_hub_and_from_pretrained(hub_server, tmp_path):
    token = hub_server.create_token("tf-user")
    model = tiny_model("qwen2", seed=3)
    tokenizer = tiny_tokenizer()
    model.push_to_hub("tf-user/tiny-qwen2", token=token)
    tokenizer.push_to_hub("tf-user/tiny-qwen2", token=token)

    loaded = AutoModelForCausalLM.from_pretrained("tf-user/tiny-qwen2", cache_dir=tmp_path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained("tf-user/tiny-qwen2", cache_dir=tmp_path)
    inputs = reloaded_tokenizer("hub", return_tensors="pt").input_ids
    assert inputs.tolist() == tokenizer("hub", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=inputs).logits, model(input_ids=inputs).logits)
