"""The toy world's base model: a ~0.9M-parameter Llama with a word-level tokenizer, built offline.

The tokenizer is a ``tokenizers`` WordLevel model over the toy world's vocabulary (every word is
one token, split on whitespace) wrapped as a ``PreTrainedTokenizerFast`` with a chat template, so
it saves next to the model and loads with ``AutoTokenizer`` like any Hub tokenizer. The model is a
plain ``LlamaForCausalLM`` from a config: it saves as ``config.json`` + ``model.safetensors`` and
loads with ``trust_remote_code`` off.

Pretraining uses a short hand-written loop (as nanoGPT does) rather than ``transformers.Trainer``:
the data is an endless stream of generated lines, not a dataset, and on a model this small the
Trainer's per-step bookkeeping would cost more than the forward pass.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quiver.errors import TrainingError
from quiver.toyworld.tasks import Example, instruction_words, pretraining_example, vocabulary
from quiver.training.data import IGNORE_INDEX, collate, load_examples, tokenize_examples

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLES = ("<system>", "<user>", "<assistant>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '> ' + message['content'] + ' ' }}"
    "{% if message['role'] == 'assistant' %}{{ '</s> ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)
MAX_POSITIONS = 32


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy world's vocabulary; unknown words become ``<unk>``."""
    words = [PAD, BOS, EOS, UNK, *ROLES, *vocabulary()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=list(ROLES),
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def instruction_token_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, ...]:
    """Token ids every prompt shares whatever its inputs: the chat template's special tokens and
    the instruction words. Sequence-level Arrow can leave them out of a prompt's scores
    (``Arrow(ignore_token_ids=...)``): they name no input domain, so no cluster."""
    words = tokenizer.convert_tokens_to_ids(instruction_words())
    return tuple(sorted({*tokenizer.all_special_ids, *words}))


def model_config(tokenizer: PreTrainedTokenizerFast, *, hidden: int = 128, layers: int = 4,
                 heads: int = 4, mlp: int = 384) -> LlamaConfig:  # fmt: skip
    """The base model's architecture: small enough to pretrain in minutes on one CPU core."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def prompt_text(tokenizer: PreTrainedTokenizerFast, prompt: str) -> str:
    """The full model input for a user prompt: the chat template with the generation prompt."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def training_pairs(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example]
) -> list[tuple[str, str]]:
    """``(templated prompt, answer)`` pairs, the form ``quiver.training`` reads; it appends
    ``</s>`` to every answer and puts the loss on the answer only."""
    return [(prompt_text(tokenizer, e.prompt), e.answer) for e in examples]


def encode(tokenizer: PreTrainedTokenizerFast, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of an example's templated prompt and of its answer (ending with ``</s>``), as
    ``quiver.training`` tokenises a pair."""
    (features,) = tokenize_examples(
        load_examples(training_pairs(tokenizer, [example])), tokenizer, max_length=MAX_POSITIONS
    )
    split = features["labels"].count(IGNORE_INDEX)
    return features["input_ids"][:split], features["input_ids"][split:]


@dataclass(frozen=True)
class PretrainConfig:
    """How the base model learns generic operations on the toy world's vocabularies."""

    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3  # 2e-3 and 3e-3 never learned to copy within 900 steps
    warmup: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise TrainingError(
                f"pretraining needs steps >= 1, batch_size >= 1 and a positive learning rate, "
                f"got {self.steps}, {self.batch_size}, {self.learning_rate}"
            )


def pretrain_base(
    config: PretrainConfig = PretrainConfig(), *, progress: bool | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Pretrain the base model from scratch; the same seed gives the same weights."""
    tokenizer = build_tokenizer()
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config(tokenizer))
    rng = random.Random(f"{config.seed}/pretraining")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98))

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to a tenth
        if step < config.warmup:
            return (step + 1) / config.warmup
        done = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    bar = tqdm(range(config.steps), desc="pretraining the base model", disable=_quiet(progress))
    for _ in bar:
        lines = [pretraining_example(rng) for _ in range(config.batch_size)]
        pairs = load_examples(training_pairs(tokenizer, lines))
        features = tokenize_examples(pairs, tokenizer, max_length=MAX_POSITIONS)
        loss = model(**collate(features, tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval(), tokenizer


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None lets tqdm hide the bar when the output is not a terminal."""
    return None if progress is None else not progress
