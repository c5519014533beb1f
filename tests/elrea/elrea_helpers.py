"""Planted data for the ELREA tests: three kinds of example whose prompts look alike within a
kind and unlike across kinds (digits, lowercase words, uppercase words)."""

import random

import torch
from peft import PeftModel

from quiver.training import TrainConfig

# Enough to move a random 2-layer model's loss in about a second per adapter.
FAST = TrainConfig(rank=4, dropout=0.0, learning_rate=1e-2, max_steps=12, batch_size=8)


def _sum(rng):
    a, b, c = (rng.randint(100, 999) for _ in range(3))
    return f"sum {a} {b} {c} =", str(a + b + c)


def _reverse(rng):
    word = "".join(rng.choice("abcdefghij") for _ in range(6))
    return f"reverse {word}:", word[::-1]


def _lower(rng):
    word = "".join(rng.choice("KLMNOPQRST") for _ in range(6))
    return f"LOWER {word}!", word.lower()


KINDS = (_sum, _reverse, _lower)


def planted_pairs(kinds, *, seed):
    """One (prompt, response) pair of each kind listed, drawn with ``seed``."""
    rng = random.Random(seed)
    return [KINDS[kind](rng) for kind in kinds]


def peft_logits(model, folder, **inputs):
    """The logits of ``model`` with the PEFT adapter at ``folder`` (the reference)."""
    peft_model = PeftModel.from_pretrained(model, str(folder))
    try:
        with torch.no_grad():
            return peft_model(**inputs).logits
    finally:
        peft_model.unload()


def peft_members(model, folders):
    """One PeftModel holding every member adapter (``name -> folder``), switched by name."""
    names = list(folders)
    peft_model = PeftModel.from_pretrained(model, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(folders[name]), adapter_name=name)
    return peft_model


@torch.no_grad()
def ensemble_logits(peft_model, weights, input_ids):
    """``sum_j w_j logits_j``, one PEFT adapter switch per member: the reference ensemble."""
    total = 0
    for name, weight in weights.items():
        peft_model.set_adapter(name)
        total = total + weight * peft_model(input_ids=input_ids).logits.float()
    return total


def greedy_reference(peft_model, weights, input_ids, steps, eos):
    """Greedy decoding of the reference ensemble without a cache, up to the first ``eos``."""
    ids = input_ids
    for _ in range(steps):
        token = ensemble_logits(peft_model, weights, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if token.item() == eos:
            break
    return ids[0, input_ids.shape[1] :].tolist()


def until_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
