"""The toy base model: an offline word-level tokenizer with a chat template, a plain Llama."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.toyworld.model import (
    PretrainConfig,
    build_tokenizer,
    encode,
    model_config,
    pretrain_base,
    prompt_text,
    training_pairs,
)
from quiver.toyworld.tasks import TASKS, Example, vocabulary


def test_tokenizer_is_one_token_per_word_and_round_trips(tmp_path):
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 7 + len(vocabulary())
    text = "map each : 3 1 4 bar !? AA"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    three = tokenizer.convert_tokens_to_ids("3")
    assert tokenizer("hello 3")["input_ids"] == [tokenizer.unk_token_id, three]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert prompt_text(loaded, "copy each : 1 2") == "<user> copy each : 1 2 <assistant>"
    chat = [{"role": "user", "content": "copy first : 1 2"}, {"role": "assistant", "content": "1"}]
    rendered = loaded.apply_chat_template(chat, tokenize=False)
    assert " ".join(rendered.split()) == "<user> copy first : 1 2 <assistant> 1 </s>"


def test_examples_tokenise_as_quiver_training_does_with_the_loss_on_answers():
    tokenizer = build_tokenizer()
    example = Example("map first : 4 5 6", "5")
    prompt, answer = encode(tokenizer, example)
    assert tokenizer.decode(prompt) == "<user> map first : 4 5 6 <assistant>"
    assert answer == [tokenizer.convert_tokens_to_ids("5"), tokenizer.eos_token_id]
    assert training_pairs(tokenizer, [example]) == [(tokenizer.decode(prompt), "5")]


def test_model_is_a_plain_llama_that_saves_and_loads_without_remote_code(tmp_path):
    tokenizer = build_tokenizer()
    config = model_config(tokenizer)
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer)
    model, _ = pretrain_base(PretrainConfig(steps=2, batch_size=4), progress=False)
    params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < params < 1.5e6
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    ids = torch.tensor([encode(tokenizer, TASKS[0].examples(1)[0])[0]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_pretraining_is_seeded():
    config = PretrainConfig(steps=3, batch_size=4, seed=7)
    first, _ = pretrain_base(config, progress=False)
    again, _ = pretrain_base(config, progress=False)
    other, _ = pretrain_base(PretrainConfig(steps=3, batch_size=4, seed=8), progress=False)
    pairs = list(zip(first.parameters(), again.parameters(), other.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert any(not torch.equal(a, c) for a, _, c in pairs)
