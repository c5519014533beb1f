"""Does the chat stream faster with the model in a process of its own? The app with its engine in
Gradio's process against the app with ``EngineProcess`` (what ``quiver app`` runs), both against
the engine alone in a process with no Gradio in it.

The same answers each way (Arrow top-2 per token, greedy, ``--tokens`` or as many as fit):

- engine alone: ``ChatEngine.stream`` in a Gradio-free process, timed where it runs: the
  reference;
- app, engine in Gradio's process: ``serve(engine=ChatEngine(...))``, engine and Gradio sharing
  a process and its GIL;
- app, engine in its own process: ``serve(engine=EngineProcess(...))``, frames over a pipe.

Both apps are called through Gradio's HTTP API by a client in a process of its own
(``benchmarks/app.py``'s), in turn with the engine alone, after a warm-up round. Medians of TTFT
and tokens per second (after the first token), each way against the engine alone.

    python benchmarks/app_process.py --model llama-512 --rounds 9
    python benchmarks/app_process.py --rounds 30
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid

from rich.console import Console
from rich.table import Table

from app import MESSAGE, Client, install_bench_library


def engine_alone(connection, registry, library_id: str) -> None:
    """The reference: answers each ``tokens`` it receives with ``(TTFT, tokens per second)``,
    timed in this process, which runs nothing but the engine."""
    import torch

    from quiver.app import ChatEngine, GenerationSettings, StrategySpec

    torch.set_num_threads(1)
    engine = ChatEngine(registry, library_id)
    connection.send("ready")
    while (tokens := connection.recv()) is not None:
        settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0)
        start, times = time.perf_counter(), []
        for frame in engine.stream(MESSAGE, [], StrategySpec("arrow", top_k=2), settings):
            times.append(time.perf_counter())
            _, routing = frame  # the last frame's is the whole answer's
        count = len(routing.tokens)
        connection.send((times[0] - start, (count - 1) / (times[-1] - times[0]), count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "llama-512"), default="demo")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="torch threads of EngineProcess's child (0: torch's default); the other ways use 1",
    )
    args = parser.parse_args()
    os.environ["QUIVER_HOME"] = tempfile.mkdtemp(prefix="quiver-bench-app-process-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    from quiver.app import ChatEngine, serve
    from quiver.app.engine_process import EngineProcess

    torch.set_num_threads(1)
    registry, library_id = install_bench_library(args.model)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    alone = context.Process(target=engine_alone, args=(theirs, registry, library_id))
    alone.start()
    theirs.close()  # the child's end: its death reaches ours.recv() as an EOFError
    ours.recv()
    in_gradio = ChatEngine(registry, library_id)
    _, tokens = in_gradio.prompt_ids(MESSAGE, [], args.tokens)  # as many as fit
    own = EngineProcess(registry, library_id, threads=args.engine_threads or None)
    apps = {
        "app, engine in Gradio's process": serve(engine=in_gradio),
        "app, engine in its own process": serve(engine=own),
    }
    client, session = Client(), uuid.uuid4().hex
    results: dict[str, list[tuple[float, float, int]]] = {
        "engine alone": [],
        **{n: [] for n in apps},
    }
    for round_ in range(args.rounds + 1):  # round 0 warms up
        ours.send(tokens)
        answers = {"engine alone": ours.recv()}
        for name, app in apps.items():
            answers[name] = client(app.local_url, tokens, session)
        if round_:
            for name, answer in answers.items():
                results[name].append(answer)
    ours.send(None)
    alone.join()
    client.close()
    for app in apps.values():
        app.close()
    own.close()

    median = {
        name: [statistics.median(run[i] for run in runs) for i in range(3)]
        for name, runs in results.items()
    }
    rate0 = median["engine alone"][1]
    table = Table(title=f"Chat on {args.model}: medians of {args.rounds} rounds")
    for column in ("way", "TTFT", "tokens/s", "alone / way", "tokens"):
        table.add_column(column, justify="right")
    for name, (ttft, rate, count) in median.items():
        table.add_row(
            name, f"{ttft * 1000:.1f} ms", f"{rate:.0f}", f"{rate0 / rate:.2f}x", f"{count:.0f}"
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
