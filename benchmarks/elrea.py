"""ELREA speed: the batched logit ensemble against a loop over PEFT adapters, and the gradient
projection against a dense one, side by side in one process.

Generation: Llama from config (hidden 512, intermediate 1376, 6 layers, 8 heads, vocab 512), a
library of a base adapter and 8 random experts (LoRA r=8 on all 7 projections) with a random
``elrea`` artifact (speed does not depend on where the centroids are), greedy generation of 32
tokens after a 16-token prompt at batch 1. "ELREA" is ``routed.generate`` with top_k members:
the prompt's gradient pass, then one batched forward of 1 x top_k rows per step. "PEFT loop"
computes the same ensemble with one ``PeftModel`` holding every adapter: per step, per member,
``set_adapter`` and a forward with that member's own KV cache, logits combined; it is handed the
weights (no gradient pass) and runs a bare decode loop (no ``generate`` overhead), so the
comparison favours it. Medians, the models called in turn after a warm-up round.

Projection: the sketch of B per-example gradients of a Llama-3.2-1B all-linear rank-8 LoRA
(16 layers, 112 modules, d_grad = 5.6M) to 8192 dimensions, against a dense Gaussian projection
of the same sizes. The dense matrix would take d_grad x 8192 x 4 bytes (172 GiB), so its cost is
measured on a slice of ``--dense-slice`` rows and scaled to d_grad (the cost is linear in it),
both as a stored matrix (a GEMM) and regenerated from a seed (``randn`` plus the GEMM).

    python benchmarks/elrea.py --repeats 7
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from rich.console import Console
from transformers import DynamicCache

from quiver.routing import route
from quiver.routing.elrea import ensemble_choice
from quiver.routing.elrea_artifact import ElreaArtifact, gradient_dim
from quiver.routing.experts import load_experts
from quiver.routing.gradients import CountSketch
from quiver.testing import make_random_expert, tiny_model
from routing import interleaved_medians  # benchmarks/routing.py

EXPERTS, RANK, PROMPT, NEW_TOKENS = 8, 8, 16, 32
FEATURES = 8192
# Llama-3.2-1B: 16 layers of q, k, v, o (hidden 2048, 8 KV heads of 64), gate, up, down (8192).
LLAMA_1B = 16 * [
    (2048, 2048), (2048, 512), (2048, 512), (2048, 2048), (2048, 8192), (2048, 8192), (8192, 2048),
]  # fmt: skip


def base_model():
    return tiny_model(
        "llama", hidden=512, intermediate_size=1376, layers=6, heads=8, num_key_value_heads=8,
        vocab_size=512,
    )  # fmt: skip


class Library(dict):
    """``name -> folder`` plus the artifact, as routing reads a library."""

    def __init__(self, paths: dict[str, Path], artifact: Path) -> None:
        super().__init__(paths)
        self.artifact = artifact

    def expert_paths(self) -> dict[str, Path]:
        return dict(self)

    def artifact_path(self, name: str) -> Path | None:
        return self.artifact if name == "elrea" else None


def random_library(folder: Path) -> Library:
    reference = base_model()
    names = ["base", *(f"cluster-{i}" for i in range(EXPERTS))]
    paths = {
        n: make_random_expert(reference, folder / n, rank=RANK, seed=i) for i, n in enumerate(names)
    }
    experts = load_experts(paths)
    generator = torch.Generator().manual_seed(0)
    artifact = ElreaArtifact(
        tuple(names), "base",
        F.normalize(torch.randn(len(names), FEATURES, generator=generator), dim=1),
        torch.zeros(len(names)), torch.full((len(names),), 0.02),
        CountSketch(FEATURES, 0), tuple(sorted(experts.modules)), gradient_dim(experts, "base"),
    )  # fmt: skip
    return Library(paths, artifact.save(folder / "elrea.safetensors"))


@torch.no_grad()
def peft_loop(peft_model, weights: dict[str, float], ids: torch.Tensor) -> torch.Tensor:
    """Greedy decoding of the ensemble, one adapter switch and one cached forward per member."""
    caches = {name: DynamicCache(config=peft_model.config) for name in weights}
    tokens, generated = ids, []
    for _ in range(NEW_TOKENS):
        logits = 0
        for name, weight in weights.items():
            peft_model.set_adapter(name)
            out = peft_model(input_ids=tokens, cache=caches[name], use_cache=True)
            logits = logits + weight * out.logits[:, -1].float()
        tokens = logits.argmax(-1, keepdim=True)
        generated.append(tokens)
    return torch.cat(generated, dim=1)


def generation(repeats: int, console: Console) -> dict[str, dict[str, float]]:
    ids = torch.randint(3, 512, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with tempfile.TemporaryDirectory() as scratch:
        library = random_library(Path(scratch))
        names = list(library)
        peft_model = PeftModel.from_pretrained(base_model(), str(library["base"]), "base")
        for name in names[1:]:
            peft_model.load_adapter(str(library[name]), adapter_name=name)
        plain = base_model()
        runs = {"base": lambda: plain.generate(ids, pad_token_id=0, **settings)}
        rows = {}
        for top_k in (2, 4, len(names)):
            routed = route(base_model(), library, "elrea", top_k=top_k)
            [weights] = ensemble_choice(routed, ids).as_dicts(routed.expert_names)
            ours = routed.generate(ids, pad_token_id=0, **settings)[:, PROMPT:]
            theirs = peft_loop(peft_model, weights, ids)
            agree = float((ours == theirs).float().mean())
            runs[f"elrea-{top_k}"] = lambda r=routed: r.generate(ids, pad_token_id=0, **settings)
            runs[f"choice-{top_k}"] = lambda r=routed: ensemble_choice(r, ids)
            runs[f"loop-{top_k}"] = lambda w=weights: peft_loop(peft_model, w, ids)
            rows[top_k] = {"agree": agree}
            console.print(f"top_k={top_k}: tokens agree with the PEFT loop: {agree:.0%}")
        medians = interleaved_medians(runs, repeats)
    for top_k, row in rows.items():
        row.update(
            base=medians["base"], elrea=medians[f"elrea-{top_k}"],
            choice=medians[f"choice-{top_k}"], loop=medians[f"loop-{top_k}"],
        )  # fmt: skip
    return rows


def projection(rows: int, dense_slice: int, repeats: int) -> dict[str, float]:
    """Seconds to project ``rows`` per-example gradients of a 1B model's LoRA to FEATURES."""
    gradients = {}
    for i, (d_in, d_out) in enumerate(LLAMA_1B):
        gradients[f"m{i}.lora_A"] = torch.randn(rows, RANK, d_in)
        gradients[f"m{i}.lora_B"] = torch.randn(rows, d_out, RANK)
    d_grad = sum(g[0].numel() for g in gradients.values())
    sketch = CountSketch(FEATURES, seed=0)
    start = time.perf_counter()
    sketch(gradients)  # the first call draws and caches every tensor's buckets and signs
    first = time.perf_counter() - start
    flat = torch.randn(rows, dense_slice)
    stored = torch.randn(dense_slice, FEATURES)
    generator = torch.Generator()

    def regenerated():
        flat @ torch.randn(dense_slice, FEATURES, generator=generator.manual_seed(0))

    medians = interleaved_medians(
        {"sketch": lambda: sketch(gradients), "stored": lambda: flat @ stored,
         "regenerated": regenerated},
        repeats,
    )  # fmt: skip
    scale = d_grad / dense_slice
    return {
        "d_grad": d_grad,
        "sketch_first": first,
        "sketch": medians["sketch"],
        "stored": medians["stored"] * scale,
        "regenerated": medians["regenerated"] * scale,
    }


def markdown(rows, proj, batch, threads, repeats) -> str:
    lines = [
        "| members (top_k) | base generate | ELREA generate | ELREA / base | of which gradient "
        "pass | PEFT loop | PEFT loop / ELREA | tokens agree |",
        "|---" * 8 + "|",
    ]
    for top_k, r in rows.items():
        cells = [
            f"{top_k}" + (" (all)" if top_k == EXPERTS + 1 else ""),
            f"{r['base'] * 1e3:.0f} ms",
            f"{r['elrea'] * 1e3:.0f} ms",
            f"{r['elrea'] / r['base']:.1f}x",
            f"{r['choice'] * 1e3:.0f} ms",
            f"{r['loop'] * 1e3:.0f} ms",
            f"{r['loop'] / r['elrea']:.1f}x",
            f"{r['agree']:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| projection of {batch} gradients (d_grad {proj['d_grad'] / 1e6:.1f}M) to {FEATURES} "
        "| time | / CountSketch |",
        "|---|---|---|",
        f"| CountSketch (ours) | {proj['sketch'] * 1e3:.0f} ms | 1x |",
        f"| CountSketch, first call (draws the hashes) | {proj['sketch_first'] * 1e3:.0f} ms "
        f"| {proj['sketch_first'] / proj['sketch']:.1f}x |",
        f"| dense Gaussian, stored (172 GiB) | {proj['stored']:.1f} s "
        f"| {proj['stored'] / proj['sketch']:.0f}x |",
        f"| dense Gaussian, regenerated from a seed | {proj['regenerated']:.1f} s "
        f"| {proj['regenerated'] / proj['sketch']:.0f}x |",
        "",
        f"Medians of {repeats} after a warm-up, {threads} torch thread(s), torch "
        f"{torch.__version__}; `python benchmarks/elrea.py`.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="Gradients per projection.")
    parser.add_argument("--dense-slice", type=int, default=16384)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    rows = generation(args.repeats, console)
    proj = projection(args.batch, args.dense_slice, args.repeats)
    print(markdown(rows, proj, args.batch, args.threads, args.repeats))


if __name__ == "__main__":
    main()
