"""A kit of tiny, offline stand-ins for the real thing: models, a tokenizer and LoRA experts.

Our machines cannot download weights, so tests, benchmarks and demos build causal LMs from configs
with random weights, a byte-level tokenizer from nothing, and random LoRA experts written as plain
PEFT folders. Everything here is deterministic given a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from quiver.errors import QuiverError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB_SIZE = 320  # 4 specials + 256 byte symbols, rounded up

# The modules a LoRA targets by default on each architecture: every attention and MLP projection.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
ARCHITECTURES = tuple(LORA_TARGETS)

_CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_config(arch: str, *, hidden: int = 32, layers: int = 2, heads: int = 4, **overrides):
    """A transformers config for a tiny ``arch`` model (see ``ARCHITECTURES``)."""
    if arch not in LORA_TARGETS:
        raise QuiverError(f"unknown test architecture {arch!r}", hint=f"use one of {ARCHITECTURES}")
    if arch == "gpt2":
        fields = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
    else:
        fields = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
        )
        if arch != "phi":
            fields["num_key_value_heads"] = max(1, heads // 2)
    fields.update(vocab_size=VOCAB_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    config = AutoConfig.for_model(arch, **fields)
    config._name_or_path = f"quiver-testing/tiny-{arch}"
    return config


def tiny_model(
    arch: str = "llama", *, seed: int = 0, dtype: torch.dtype | None = None, **config_overrides
) -> PreTrainedModel:
    """A causal LM of ``arch`` with random weights, in eval mode, named after its config."""
    config = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.name_or_path = config._name_or_path
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer that needs no files: every UTF-8 byte is one token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def lora_target_layers(model: PreTrainedModel, target_modules: tuple[str, ...]):
    """Yield ``(name, in_features, out_features, is_conv1d)`` for every layer a LoRA would wrap."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in target_modules:
            continue
        if isinstance(module, torch.nn.Linear):
            yield name, module.in_features, module.out_features, False
        elif isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            yield name, in_features, out_features, True


def make_random_expert(
    model: PreTrainedModel,
    path: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] | None = None,
    seed: int = 0,
    b_std: float = 0.02,
    spectral_gap: float | None = None,
) -> Path:
    """Write a random LoRA expert for ``model`` as a plain PEFT folder and return its path.

    ``B`` is non-zero, so the expert changes the model's outputs. ``spectral_gap`` scales the first
    rank-1 component of every module so that ``B @ A`` has a clear top singular direction (useful
    where a test compares routers that approximate it differently).
    """
    arch = model.config.model_type
    target_modules = tuple(target_modules or LORA_TARGETS[arch])
    layers = list(lora_target_layers(model, target_modules))
    if not layers:
        raise QuiverError(
            f"none of {target_modules} is a Linear or Conv1D layer of this {arch} model",
            hint="pass target_modules that name the model's projection layers",
        )
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, in_features, out_features, _ in layers:
        lora_a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        lora_b = torch.randn(out_features, rank, generator=generator) * b_std
        if spectral_gap is not None:
            lora_b[:, 0] *= spectral_gap
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        fan_in_fan_out=any(is_conv for *_, is_conv in layers),
        task_type="CAUSAL_LM",
        base_model_name_or_path=model.name_or_path,
    )
    config.save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path
