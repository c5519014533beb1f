"""Tiny tasks for the training tests: each maps a word to a different answer."""

import json

from quiver.training import TrainConfig

WORDS = ["abc", "hello", "world", "quiver", "lora", "train", "model", "expert", "arrow", "mbc"]
TASKS = {
    "upper": lambda word: word.upper(),
    "reverse": lambda word: word[::-1],
    "double": lambda word: word + word,
}
# Enough to move a random 2-layer model's loss on a task in about a second.
FAST = TrainConfig(rank=4, dropout=0.0, learning_rate=1e-2, max_steps=12, batch_size=8)


def pairs(task: str, words=WORDS) -> list[tuple[str, str]]:
    return [(f"{task} {word}:", TASKS[task](word)) for word in words]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def planted_experts(model, folder, *, groups=3, per_group=3, noise=0.1, refactor=False, seed=0):
    """PEFT experts in ``groups`` planted clusters: each shares most of its group's weights.

    With ``refactor``, every expert's update B A is written as (B M)(M^-1 A) for its own random
    M, as if it had started from its own LoRA init. Returns ``name -> folder`` and the groups.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    factors = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    centres = [
        {n: torch.randn(p.shape, generator=generator) for n, p in factors.items()}
        for _ in range(groups)
    ]
    paths, truth = {}, {}
    for group, centre in enumerate(centres):
        for member in range(per_group):
            name = f"g{group}-e{member}"
            with torch.no_grad():
                for n, p in factors.items():
                    p.copy_(centre[n] + noise * torch.randn(p.shape, generator=generator))
                if refactor:
                    for n, p in factors.items():
                        if "lora_A" in n:
                            q, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator))
                            mix = q * torch.empty(4).uniform_(0.5, 2.0, generator=generator)
                            b = factors[n.replace("lora_A", "lora_B")]
                            b.copy_(b @ mix)
                            p.copy_(torch.linalg.inv(mix) @ p)
            peft_model.save_pretrained(folder / name, save_embedding_layers=False)
            paths[name], truth[name] = folder / name, group
    peft_model.unload()
    return paths, truth
