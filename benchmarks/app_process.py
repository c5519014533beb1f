"""Would the chat stream faster with the model in a process of its own? The app as it is (engine
and Gradio in one process) against a relay: the same engine in a Gradio-free process, whose
frames a bare Gradio endpoint passes on.

Three ways, the same answers (Arrow top-2 per token, greedy, ``--tokens`` or as many as fit):

- engine alone: ``ChatEngine.stream`` in a process with no Gradio in it (the relay's engine,
  timed where it runs): the reference;
- app, one process: ``quiver.app.serve``'s ``/chat``, engine and Gradio sharing a process (and
  its GIL), as the app runs today;
- relay, engine in its own process: a Gradio ``/chat`` endpoint that forwards the call to the
  engine's process over a pipe and yields the frames it sends back.

Both apps are called through Gradio's HTTP API by a client in a third process
(``benchmarks/app.py``'s), in turn, after a warm-up round. Medians of TTFT and tokens per second
(after the first token), each way against the engine alone.

    python benchmarks/app_process.py --model llama-512 --rounds 9
    python benchmarks/app_process.py --rounds 30
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

from rich.console import Console
from rich.table import Table

from app import MESSAGE, Client, open_bench_engine


def _quiet_home() -> None:
    os.environ["QUIVER_HOME"] = tempfile.mkdtemp(prefix="quiver-bench-app-process-")
    os.environ["HF_HUB_OFFLINE"] = "1"


def engine_process(connection, model: str, tokens: int) -> None:
    """The relay's engine: answers each ``(message, tokens)`` it receives with its frames, then
    ``("end", (TTFT, tokens per second))`` as timed here."""
    _quiet_home()
    import torch

    from quiver.app import GenerationSettings, StrategySpec

    torch.set_num_threads(1)
    engine = open_bench_engine(model)
    _, tokens = engine.prompt_ids(MESSAGE, [], tokens)
    engine.model.generation_config.min_new_tokens = tokens  # every way writes them all
    connection.send(tokens)
    strategy = StrategySpec("arrow", top_k=2)
    while (call := connection.recv()) is not None:
        message, count = call
        settings = GenerationSettings(max_new_tokens=count, temperature=0.0)
        start, times = time.perf_counter(), []
        for text, routing in engine.stream(message, [], strategy, settings):
            times.append(time.perf_counter())
            connection.send(("frame", (text, routing.to_dict() if routing else None)))
        rate = (count - 1) / (times[-1] - times[0])
        connection.send(("end", (times[0] - start, rate)))


def relay_app(connection, alone: list):
    """A Gradio app whose ``/chat`` (the app's signature) forwards to the engine's process."""
    import gradio as gr

    lock = threading.Lock()  # one answer at a time through the one pipe

    def chat(
        message: str,
        strategy: str = "arrow",
        top_k: int = 2,
        router_temperature: float = 1.0,
        mixing: str = "outputs",
        granularity: str = "token",
        expert: str = "",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        history: list | None = None,
        prompt_layers: list[int] | None = None,
    ) -> Iterator[tuple[str, dict]]:
        with lock:
            connection.send((message, max_new_tokens))
            while True:
                kind, payload = connection.recv()
                if kind == "end":
                    alone.append(payload)
                    return
                yield payload

    with gr.Blocks() as relay:
        gr.api(chat, api_name="chat")
    relay.launch(prevent_thread_lock=True, quiet=True, ssr_mode=False)
    return relay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "llama-512"), default="demo")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    _quiet_home()
    import torch

    from quiver.app import serve

    torch.set_num_threads(1)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    worker = context.Process(target=engine_process, args=(theirs, args.model, args.tokens))
    worker.start()
    tokens = ours.recv()
    alone: list[tuple[float, float]] = []
    relay = relay_app(ours, alone)
    engine = open_bench_engine(args.model)
    engine.model.generation_config.min_new_tokens = tokens
    app = serve(engine=engine)
    client, session = Client(), uuid.uuid4().hex
    ways = {"app, one process": app.local_url, "relay, engine in its own process": relay.local_url}
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in ways}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, url in ways.items():
            result = client(url, tokens, session)
            if round_:
                results[name].append(result)
    ours.send(None)
    worker.join()
    client.close()
    app.close()
    relay.close()

    ttft0 = statistics.median(t for t, _ in alone[1:])
    rate0 = statistics.median(r for _, r in alone[1:])
    table = Table(title=f"Chat on {args.model}: medians of {args.rounds} rounds, {tokens} tokens")
    for column in ("way", "TTFT", "tokens/s", "alone / way"):
        table.add_column(column, justify="right")
    table.add_row("engine alone (no Gradio in its process)", f"{ttft0 * 1000:.1f} ms",
                  f"{rate0:.0f}", "1.00x")  # fmt: skip
    for name, runs in results.items():
        ttft = statistics.median(run[0] for run in runs)
        rate = statistics.median(run[1] for run in runs)
        table.add_row(name, f"{ttft * 1000:.1f} ms", f"{rate:.0f}", f"{rate0 / rate:.2f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
