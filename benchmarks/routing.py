"""Routing speed: our Arrow against PEFT's create_arrow_model, side by side in one process.

The setup of our PEFT anchors: Llama from config (hidden 512, intermediate 1376, 6 layers,
8 heads, vocab 512), random LoRA experts r=8 alpha 16 on all 7 projections, top-k 4, T=1,
batch 4 x 128, no grad. Forward times are medians, the models called in turn after one warm-up
round; build times exclude creating the base model; peak memory is the largest sum of live
tensors the torch profiler saw during one forward, minus the base model's.

"Matmuls" is the base model plus the routing's own arithmetic done as plain torch matmuls of the
same sizes, timed in the same rounds: what routing would cost at torch's GEMM speed on these
skinny shapes, with no gathering, sorting or top-k at all.

"Seq" is Arrow at sequence granularity over the same experts: its forward includes the no-expert
pass that scores the prompt (the whole input here); its decoding, the chosen k experts per row.

    python benchmarks/routing.py --experts 8,32,64,128 --peft-max 64 --readme README.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from peft import ArrowConfig, create_arrow_model
from rich.console import Console
from rich.progress import track
from torch.profiler import ProfilerActivity, profile

from quiver.routing import Arrow, route
from quiver.testing import LORA_TARGETS, lora_target_layers, make_random_expert, tiny_model

SECTION = "## Routing speed"
TOP_K, RANK = 4, 8
DECODE_TOKENS = 32


def base_model(hidden: int):
    """The anchors' Llama (hidden 512, intermediate 1376), optionally scaled to another width."""
    return tiny_model(
        "llama",
        hidden=hidden,
        intermediate_size=hidden * 43 // 16,
        layers=6,
        heads=8,
        num_key_value_heads=8,
        vocab_size=512,
    )


def interleaved_medians(forwards: dict, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per forward, calling the models in turn so load noise hits all alike.
    (``clock=time.process_time`` counts only this process's CPU time: with one thread, what a
    loaded machine's other processes take is not counted.)"""
    times = {name: [] for name in forwards}
    for round_ in range(repeats + 1):  # round 0 warms up (PEFT builds prototypes on first use)
        for name, forward in forwards.items():
            start = clock()
            forward()
            if round_:
                times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_mib(fn) -> float:
    """Largest total of live CPU tensors while ``fn`` runs, by the profiler's alloc/free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def routing_matmuls(model, experts: int, tokens: int):
    """Per routed layer, what Arrow must compute beyond the base layer, as plain matmuls: the
    routing product (tokens x E x in) and the chosen experts' low-rank products (tokens x k*r x
    in, then tokens x k*r x out)."""
    shapes = [
        ((tokens, d_in), (d_in, experts), (d_in, TOP_K * RANK), (TOP_K * RANK, d_out))
        for _, d_in, d_out, _ in lora_target_layers(model, LORA_TARGETS["llama"])
    ]
    operands = [[torch.randn(shape) for shape in layer] for layer in shapes]

    def matmuls():
        for x, prototypes, lora_a, lora_b in operands:
            x @ prototypes
            (x @ lora_a) @ lora_b

    return matmuls


def forward_of(model, ids):
    def forward():
        with torch.no_grad():
            model(ids)

    return forward


def decode_of(model, ids):
    """Greedy generation of DECODE_TOKENS new tokens for one 16-token prompt: the chat case."""

    def decode():
        model.generate(
            ids[:1, :16],
            max_new_tokens=DECODE_TOKENS,
            min_new_tokens=DECODE_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )

    return decode


def timed_build(build, *args):
    start = time.perf_counter()
    model = build(*args)
    return model, time.perf_counter() - start


def measure_row(experts, paths, ids, hidden, peft_max, repeats, console):
    console.print(f"E={experts}")
    base = base_model(hidden)
    ours, ours_build = timed_build(route, base_model(hidden), paths, Arrow(top_k=TOP_K))
    seq = route(base_model(hidden), paths, Arrow(top_k=TOP_K, granularity="sequence"))
    forwards = {"base": forward_of(base, ids), "ours": forward_of(ours, ids)}
    forwards["seq"] = forward_of(seq, ids)
    forwards["matmuls"] = routing_matmuls(base, experts, ids.numel())
    row = dict(E=experts, ours_build=ours_build)
    if experts <= peft_max:
        config = ArrowConfig(top_k=TOP_K, router_temperature=1.0, rng_seed=0)
        folders, fresh = [str(p) for p in paths], base_model(hidden)
        peft, row["peft_build"] = timed_build(create_arrow_model, fresh, folders, config)
        forwards["peft"] = forward_of(peft, ids)
    row.update(interleaved_medians(forwards, repeats))
    row["matmuls"] += row["base"]
    del forwards["matmuls"], forwards["seq"]
    peaks = {name: peak_mib(forward) for name, forward in forwards.items()}
    row.update({f"{name}_peak": peak - peaks["base"] for name, peak in peaks.items()})
    decodes = {name: decode_of(model, ids) for name, model in [("base", base), ("ours", ours)]}
    decodes["seq"] = decode_of(seq, ids)
    decoded = interleaved_medians(decodes, max(3, repeats // 2))
    row["decode"] = decoded["ours"] / decoded["base"]
    row["decode_seq"] = decoded["seq"] / decoded["base"]
    return row


def measure_decode(experts, paths, ids, hidden, repeats, clock) -> dict[str, float]:
    """Decoding alone (``--decode-only``): our Arrow's greedy decoding against the base model's."""
    base, ours = base_model(hidden), route(base_model(hidden), paths, Arrow(top_k=TOP_K))
    decodes = {"base": decode_of(base, ids), "ours": decode_of(ours, ids)}
    decoded = interleaved_medians(decodes, repeats, clock)
    return dict(E=experts, **decoded, decode=decoded["ours"] / decoded["base"])


def run(expert_counts, console, measure, *args):
    """``measure(E, paths, ids, *args)`` for each E, on random experts written once."""
    ids = torch.randint(3, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        reference = base_model(args[0])
        writing = track(range(max(expert_counts)), description="writing experts", console=console)
        paths = [make_random_expert(reference, Path(folder) / f"e{i:03d}", seed=i) for i in writing]
        return [measure(e, paths[:e], ids, *args) for e in expert_counts]


def markdown(rows, hidden, repeats) -> str:
    lines = [
        "| E | forward base | forward ours | ours / base | matmuls / base | forward PEFT "
        "| PEFT / ours | PEFT / matmuls | build ours | build PEFT | PEFT / ours "
        "| extra peak ours | extra peak PEFT | decode ours / base | seq / base "
        "| decode seq / base |",
        "|---" * 16 + "|",
    ]
    for r in rows:
        peft = "peft" in r
        cells = [
            str(r["E"]),
            f"{r['base'] * 1e3:.0f} ms",
            f"{r['ours'] * 1e3:.0f} ms",
            f"{r['ours'] / r['base']:.2f}x",
            f"{r['matmuls'] / r['base']:.2f}x",
            f"{r['peft'] * 1e3:.0f} ms" if peft else "skipped",
            f"{r['peft'] / r['ours']:.1f}x" if peft else "-",
            f"{r['peft'] / r['matmuls']:.1f}x" if peft else "-",
            f"{r['ours_build']:.2f} s",
            f"{r['peft_build']:.2f} s" if peft else "skipped",
            f"{r['peft_build'] / r['ours_build']:.0f}x" if peft else "-",
            f"{r['ours_peak']:.1f} MiB",
            f"{r['peft_peak']:.1f} MiB" if peft else "-",
            f"{r['decode']:.2f}x",
            f"{r['seq'] / r['base']:.2f}x",
            f"{r['decode_seq']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"Hidden {hidden}. Medians of {repeats} after a warm-up; `python benchmarks/routing.py` "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads). Extra peak = largest "
        "live tensor memory during one forward minus the base model's (torch tensors; the CPU "
        "kernels' own scratch, about 100 KiB a thread at E=32, is not seen). Matmuls = the base "
        "model plus the routing's arithmetic as plain torch matmuls (tokens x E x in and tokens "
        "x k*r x (in + out) per routed layer), i.e. routing at torch's own GEMM speed. Decode = "
        f"greedy generation of {DECODE_TOKENS} tokens after a 16-token prompt at batch 1. Seq = "
        "Arrow per sequence (top-k 4): its forward includes the no-expert pass that scores the "
        "prompt (the whole input)."
    )
    lines.append("\n" + textwrap.fill(note, 100))
    return "\n".join(lines)


def write_readme(readme: Path, table: str) -> None:
    """Replace (or append) the README's routing-speed section with the latest table."""
    text = readme.read_text()
    intro = (
        "Our Arrow over E experts against PEFT's `create_arrow_model`, and our Arrow per sequence, "
        "side by side with the base model (Llama from config, 6 layers, LoRA r=8 on all 7 "
        "projections, top-k 4, batch 4 x 128, CPU):"
    )
    body = f"{SECTION}\n\n{textwrap.fill(intro, 100)}\n\n{table}\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + ("\n" + text[end + 1 :] if end >= 0 else "")
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,32,64,128", help="comma-separated E values")
    parser.add_argument("--peft-max", type=int, default=64, help="skip PEFT above this E")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512, help="model width (anchors: 512)")
    parser.add_argument("--readme", type=Path, help="write the table into this README")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--decode-only", action="store_true", help="only decoding ours / base")
    parser.add_argument(
        "--cpu-time", action="store_true", help="decoding in process CPU time (use --threads 1)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    counts = sorted(int(e) for e in args.experts.split(","))
    skipped = [e for e in counts if e > args.peft_max]
    if skipped:
        console.print(f"note: PEFT skipped for E={skipped} (above --peft-max {args.peft_max})")
    if args.decode_only:
        clock = time.process_time if args.cpu_time else time.perf_counter
        for row in run(counts, console, measure_decode, args.hidden, args.repeats, clock):
            print(
                f"E={row['E']}: decoding {DECODE_TOKENS} tokens, base {row['base'] * 1e3:.0f} ms, "
                f"ours {row['ours'] * 1e3:.0f} ms, ours / base {row['decode']:.2f}x"
            )
        return
    rows = run(counts, console, measure_row, args.hidden, args.peft_max, args.repeats, console)
    table = markdown(rows, args.hidden, args.repeats)
    print(table)
    if args.readme:
        write_readme(args.readme, table)


if __name__ == "__main__":
    main()
