"""Train a library of 8 tiny experts one after another and on Ray with 2 workers, side by side.

The toy world's setting: a ~1M-parameter Llama (hidden 128, 4 layers, MLP 512), LoRA r=8 on all 7
projections, 8 string tasks. Sequential: ``train_experts(backend="local")``, each expert with one
torch thread (the same experts as Ray's, bit for bit) and with both cores' threads. Ray: a local
Ray with 2 CPUs, one expert per CPU, timed twice per run: including its start (``ray.init``, the
workers' first imports: a one-off script's case) and again on the Ray already up (a cluster
user's case). Prints wall times (medians of ``--runs``), the speed-ups over both sequential runs
and trained tokens per second. Goal: >= 1.5x.

    python benchmarks/train_library.py [--runs 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quiver.testing import tiny_model, tiny_tokenizer
from quiver.training import TrainConfig, prepare_data, train_experts

TASKS = {
    "upper": str.upper,
    "reverse": lambda w: w[::-1],
    "double": lambda w: w + w,
    "first3": lambda w: w[:3],
    "last3": lambda w: w[-3:],
    "sort": lambda w: "".join(sorted(w)),
    "novowel": lambda w: "".join(c for c in w if c not in "aeiou"),
    "swap": str.swapcase,
}


def make_data(examples: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 9)))
        for _ in range(examples)
    ]
    return {task: [(f"{task} {w}:", fn(w)) for w in words] for task, fn in TASKS.items()}


def trained_tokens(data, tokenizer, config: TrainConfig) -> int:
    """Tokens the experts see: steps x batch x the mean example length, summed over experts."""
    total = 0
    for task, pairs in data.items():
        features = prepare_data(pairs, tokenizer, max_length=256, task=task).features
        mean = sum(len(f["input_ids"]) for f in features) / len(features)
        total += config.max_steps * config.batch_size * mean
    return int(total)


def train(base, data, config, scratch: Path, label: str, backend: str, threads: int) -> list:
    results = train_experts(
        base,
        data,
        config=config,
        backend=backend,
        cpus_per_expert=threads,
        output_dir=scratch / label.replace(" ", "-"),
        progress=False,
    )
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed
    return [r.sha256 for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads of sequential runs"
    )
    args = parser.parse_args()

    import ray

    config = TrainConfig(
        rank=8, alpha=16, dropout=0.0, learning_rate=4e-3, max_steps=args.steps, batch_size=16
    )
    data = make_data(args.examples)
    tokenizer = tiny_tokenizer()
    tokens = trained_tokens(data, tokenizer, config)
    sequential = {f"sequential, {n} thread(s)": n for n in args.threads}
    cold, warm = RAY_COLD, RAY_WARM
    times: dict[str, list[float]] = {label: [] for label in [*sequential, cold, warm]}
    hashes: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        base = scratch / "base"
        model = tiny_model("llama", hidden=128, layers=4, heads=4, intermediate_size=512)
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        params = sum(p.numel() for p in model.parameters())
        for run in range(args.runs + 1):  # run 0 warms up this process (imports, caches)
            elapsed = {}
            for label, threads in sequential.items():
                start = time.perf_counter()
                hashes[label] = train(
                    base, data, config, scratch / str(run), label, "local", threads
                )
                elapsed[label] = time.perf_counter() - start
            start = time.perf_counter()  # a fresh local Ray: its start and its workers' imports
            ray.init(
                num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
            )
            hashes[cold] = train(base, data, config, scratch / str(run), cold, "ray", 1)
            elapsed[cold] = time.perf_counter() - start
            start = time.perf_counter()  # the same Ray again: a cluster that is already up
            hashes[warm] = train(base, data, config, scratch / str(run), warm, "ray", 1)
            elapsed[warm] = time.perf_counter() - start
            ray.shutdown()
            if run:
                for label, seconds in elapsed.items():
                    times[label].append(seconds)
    report(times, hashes, tokens, params, args)


RAY_COLD = "Ray, 2 workers x 1 thread, including its start (ray.init, workers' imports)"
RAY_WARM = "Ray, 2 workers x 1 thread, cluster already up"


def report(times, hashes, tokens: int, params: int, args) -> None:
    medians = {label: statistics.median(runs) for label, runs in times.items()}
    print(
        f"8 experts, {params / 1e6:.2f}M-parameter Llama, LoRA r=8 on 7 projections, "
        f"{args.steps} steps x batch 16; torch {torch.__version__}; medians of {args.runs}"
    )
    baselines = [f"sequential, {n} thread(s)" for n in args.threads]
    print(
        "| run | wall time | tokens / s | "
        + " | ".join(f"speed-up over {b}" for b in baselines)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(baselines))
    for label, median in medians.items():
        ratios = " | ".join(f"{medians[b] / median:.2f}x" for b in baselines)
        print(f"| {label} | {median:.1f} s | {tokens / median:,.0f} | {ratios} |")
    if 1 in args.threads:
        one = hashes["sequential, 1 thread(s)"]
        same = one == hashes[RAY_COLD] == hashes[RAY_WARM]
        print(f"Ray's experts equal the 1-thread sequential ones bit for bit: {same}")
    for label, runs in times.items():
        print(f"{label}: {', '.join(f'{t:.1f} s' for t in runs)}")


if __name__ == "__main__":
    main()
