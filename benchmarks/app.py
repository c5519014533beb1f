"""The app's overhead on a chat: time to first token and tokens per second on the embedded default
(or on a bigger model), against calling the routed model directly, side by side in one process.

Four ways to answer the same prompt with the same routed model (Arrow top-2, greedy, every way
made to write the same ``--tokens`` tokens, or as many as the context leaves room for: 24 on the
demo's 32 positions). ``--model demo``: the embedded default (the toy world's 0.87M-parameter
Llama and its four experts); ``--model llama-512``: four random experts on a ``quiver.testing``
Llama of hidden size 512 and 6 layers (14.5M parameters):

- direct: ``route(model, library, Arrow(top_k=2)).generate(..., streamer=...)``, the reference;
- direct, traced: the same inside ``routed.trace()``, and the per-token routing read from it (what
  the routing picture needs);
- using(), in a thread: the engine's shared routed model under ``routed.using(Arrow top-2)``,
  traced, generating in a worker thread as the engine does, without the engine's streaming;
- engine: ``ChatEngine.stream`` (``routed.using``, worker thread, decoding, the routing);
- app (HTTP): the app served on 127.0.0.1, its ``/chat`` endpoint called through Gradio's HTTP API
  (POST the call, read its server-sent events) by a client in a process of its own, as every
  real client is: queue, JSON, HTTP, what any client sees. The calls share one session, as a
  ``gradio_client.Client``'s calls and a page's chats do;
  (``gradio_client`` adds its own waits on top: it polls for messages every 50 ms);
- app (HTTP), new session: each call in a session of its own (what a call without a
  ``session_hash`` gets): Gradio builds a session's state from every block of the app (129) first;
- Gradio alone (replay): a bare Gradio app streaming the same answer's updates through the same
  HTTP API with no model: Gradio's own cost per streamed answer, the floor under the app's.

Time to first token (TTFT) runs from the request to the first token's text; tokens per second
counts the tokens after the first over the time from the first token to the complete answer
(with its routing). CPU is this process's CPU time per answer (every thread: model, server; not
the client's process), which a loaded machine disturbs far less than wall time. The ways are
called in turn in every round after a warm-up; medians are reported with their ratio to direct
(goal: app < 1.10), beside the median of the rounds' own ratios (each round's CPU against the
same round's direct, which cancels the changing load of a shared machine), and the extra CPU per
token each layer adds.

    python benchmarks/app.py --rounds 9
    python benchmarks/app.py --model llama-512 --rounds 5
    python benchmarks/app.py --model llama-512 --rounds 7 --queue-poll 0.01
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table
from transformers.generation.streamers import BaseStreamer

MESSAGE = "map each : purple black brown white"  # one of the demo's, any text for the others


class _Clock(BaseStreamer):
    """Records when each generated token arrives (``generate`` first puts the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _measure(start: float, times: list[float]) -> tuple[float, float]:
    """(TTFT seconds, tokens per second after the first) from arrival times."""
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return times[0] - start, rate


def direct(routed, input_ids, tokens: int, *, traced: bool = False) -> tuple[float, float, int]:
    """The routed model's own ``generate``; ``traced``: inside ``routed.trace()``, reading the
    per-token routing the picture shows once the answer is complete."""
    clock = _Clock()
    start = time.perf_counter()
    with routed.trace() if traced else nullcontext() as trace:
        routed.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    if traced:
        trace.step_layer_weights()
        clock.times[-1] = time.perf_counter()  # the answer is complete with its routing
    return (*_measure(start, clock.times), len(clock.times))


def using_in_thread(engine, strategy, input_ids, tokens: int) -> tuple[float, float, int]:
    """``direct(traced=True)`` on the engine's shared model under ``using()``, in a thread."""
    name, options = strategy.using()
    results = []

    def run() -> None:
        with engine.routed.using(name, **options):
            results.append(direct(engine.routed, input_ids, tokens, traced=True))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return results[0]


def engine_stream(engine, strategy, settings) -> tuple[float, float, int]:
    times, updates = [], []
    start = time.perf_counter()
    for update in engine.stream(MESSAGE, [], strategy, settings):
        times.append(time.perf_counter())
        updates.append(update)
    count = len(updates[-1][1].tokens)
    return times[0] - start, (count - 1) / (times[-1] - times[0]), count


def app_stream(
    http: httpx.Client,
    url: str,
    tokens: int,
    session: str | None,
    *,
    data: list | None = None,
    frames: list | None = None,
) -> tuple[float, float, int]:
    """The /chat endpoint through Gradio's HTTP API (POST the call, then read its server-sent
    events), every update timed as it arrives; ``session``: the session hash, None for a new
    session; ``data``: the call's inputs (default: the app's chat, Arrow top-2, greedy);
    ``frames``: a list that collects the updates as they came."""
    times, count = [], 0
    start = time.perf_counter()
    data = data or [MESSAGE, "arrow", 2, 1.0, "outputs", "token", "", tokens, 0.0, 1.0, None, None]
    call = {"data": data, "session_hash": session}
    event = http.post(f"{url}gradio_api/call/chat", json=call).json()["event_id"]
    with http.stream("GET", f"{url}gradio_api/call/chat/{event}") as events:
        for line in events.iter_lines():
            if not line.startswith("data:"):
                continue
            payload = json.loads(line.removeprefix("data:"))
            if not isinstance(payload, list):  # an error message
                raise RuntimeError(f"the app answered {payload}")
            if frames is not None:
                frames.append(payload[0])
            text, routing = payload[0]
            if text and routing is None:
                times.append(time.perf_counter())
            elif routing is not None:
                times.append(time.perf_counter())
                count = len(routing["tokens"])
    ttft = times[0] - start
    return ttft, (count - 1) / (times[-1] - times[0]), count


class Client:
    """``app_stream`` in a process of its own, as a real client is: its CPU is not the server's,
    and its parsing does not hold the server's GIL."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_answer_calls, args=(theirs,), daemon=True)
        self.process.start()

    def __call__(self, *args, **kwargs):
        self.connection.send((args, kwargs))
        result = self.connection.recv()
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def _answer_calls(connection) -> None:
    """The client process: one ``app_stream`` per call its parent sends, until None."""
    http = httpx.Client(timeout=60)
    while (call := connection.recv()) is not None:
        args, kwargs = call
        try:
            connection.send(app_stream(http, *args, **kwargs))
        except Exception as error:  # to the parent, which raises it
            connection.send(RuntimeError(f"{type(error).__name__}: {error}"))


class ThreadCPU:
    """CPU seconds per group of this process's threads, each read from its own CPU clock: the
    caller (the main thread: direct's model, the engine's reader), the engine's answer threads
    (each reads its own clock as it ends), Gradio's workers (AnyIO) and the rest (Gradio's
    server and event loop, which polls its queue every millisecond even when idle)."""

    GROUPS = ("caller", "answer threads", "Gradio's workers", "server and other threads")

    def __init__(self, engine) -> None:
        self.answers = 0.0
        answer = type(engine)._answer

        def timed(engine, *args) -> None:
            start = time.thread_time()
            try:
                answer(engine, *args)
            finally:
                self.answers += time.thread_time() - start

        engine._answer = timed.__get__(engine)  # this engine's answers, read as they end

    def read(self) -> dict[str, float]:
        groups = dict.fromkeys(self.GROUPS, 0.0)
        groups["answer threads"] = self.answers
        for thread in threading.enumerate():
            if "_answer" in thread.name:
                continue  # a running answer: counted when it ends
            try:
                cpu = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, TypeError):  # ended since enumerate()
                continue
            if thread is threading.main_thread():
                groups["caller"] += cpu
            elif thread.name.startswith("AnyIO worker"):
                groups["Gradio's workers"] += cpu
            else:
                groups["server and other threads"] += cpu
        return groups


def gradio_floor(frames: list):
    """A bare Gradio app whose streamed endpoint replays an answer's updates with no model: what
    Gradio itself (queue, JSON, HTTP, server-sent events) costs any streamed answer, the floor
    under "app (HTTP)"."""
    import gradio as gr

    def replay(message: str):
        yield from frames

    with gr.Blocks() as floor:
        message, answer = gr.Textbox(), gr.JSON()
        message.submit(replay, message, answer, api_name="chat")
    floor.launch(prevent_thread_lock=True, quiet=True, ssr_mode=False)
    return floor


def install_bench_library(model: str) -> tuple:
    """(registry, library id) in the local store of ``$QUIVER_HOME``: the embedded default, or
    random experts over a bigger Llama; either base model never ends an answer early, so that
    every way writes as many tokens as asked for (or as fit)."""
    from quiver.app.demo import DEMO_BASE_MODEL, ensure_demo_library, install_random_library
    from quiver.registry import LocalRegistry
    from quiver.routing.base_model import load_base_model, push_base_model
    from quiver.testing import tiny_model, tiny_tokenizer

    registry = LocalRegistry()
    if model == "demo":
        library_id = ensure_demo_library(registry)
        base, tokenizer = load_base_model(registry, DEMO_BASE_MODEL)
    else:
        base = tiny_model("llama", hidden=512, layers=6, heads=8, max_position_embeddings=1024)
        base.name_or_path, tokenizer = "bench/llama-512", tiny_tokenizer()
    base.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    if model == "demo":
        push_base_model(registry, DEMO_BASE_MODEL, base, tokenizer, message="Never end early")
        return registry, library_id
    library = install_random_library(registry, "bench/llama-512-experts", base, tokenizer)
    return registry, library.repo_id


def open_bench_engine(model: str):
    """The engine on ``install_bench_library(model)``."""
    from quiver.app import ChatEngine

    return ChatEngine(*install_bench_library(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "llama-512"), default="demo")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--queue-poll",
        type=float,
        help="seconds between the app's Gradio queue looks for work (Gradio's private "
        "sleep_when_free: 0.001 by default, no public setting), to measure what it costs",
    )
    args = parser.parse_args()
    os.environ["QUIVER_HOME"] = tempfile.mkdtemp(prefix="quiver-bench-app-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)

    from quiver.app import GenerationSettings, StrategySpec, serve
    from quiver.routing import Arrow, route
    from quiver.routing.base_model import load_base_model

    engine = open_bench_engine(args.model)
    app = serve(engine=engine)
    if args.queue_poll is not None:
        app._queue.sleep_when_free = args.queue_poll
    client = Client()
    session = uuid.uuid4().hex  # one client's session, as gradio_client keeps
    library = engine.library
    model, _ = load_base_model(engine.registry, library.manifest.base_model)
    routed = route(model, library, Arrow(top_k=2))  # a second copy: the reference
    strategy = StrategySpec("arrow", top_k=2)
    input_ids, tokens = engine.prompt_ids(MESSAGE, [], args.tokens)  # as many as fit
    for copy in (engine.model, model):  # every way writes them all (no early end of text)
        copy.generation_config.min_new_tokens = tokens
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0)
    frames: list = []  # one answer's updates as the app streams them, for Gradio's floor
    app_stream(httpx.Client(timeout=60), app.local_url, tokens, session, frames=frames)
    floor = gradio_floor(frames)

    ways = {
        "direct": lambda: direct(routed, input_ids, tokens),
        "direct, traced": lambda: direct(routed, input_ids, tokens, traced=True),
        "using(), in a thread": lambda: using_in_thread(engine, strategy, input_ids, tokens),
        "engine": lambda: engine_stream(engine, strategy, settings),
        "app (HTTP)": lambda: client(app.local_url, tokens, session),
        "app (HTTP), new session": lambda: client(app.local_url, tokens, None),
        "Gradio alone (replay)": lambda: client(floor.local_url, tokens, session, data=[MESSAGE]),
    }
    threads = ThreadCPU(engine)
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in ways}
    split: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for round_ in range(args.rounds + 1):  # round 0 warms up (kernels, caches, connections)
        for name, way in ways.items():
            before, cpu = threads.read(), time.process_time()
            result = way()
            if round_:
                results[name].append((*result, time.process_time() - cpu))
                after = threads.read()
                split[name].append({group: after[group] - before[group] for group in after})
    client.close()
    app.close()
    floor.close()
    report(results, args)
    report_threads(split)


def report(results: dict[str, list[tuple[float, ...]]], args: argparse.Namespace) -> None:
    """Medians of TTFT, tokens/s and CPU seconds per answer (every thread of this process: the
    model, the server; the HTTP client runs in its own), each against direct; and the median over
    rounds of each round's CPU against that round's direct (paired: the load of the moment cancels
    out)."""
    median = {
        name: [statistics.median(run[i] for run in runs) for i in range(4)]
        for name, runs in results.items()
    }
    paired = {
        name: statistics.median(
            run[3] / direct[3] for run, direct in zip(runs, results["direct"], strict=True)
        )
        for name, runs in results.items()
    }
    ttft0, rate0, _, cpu0 = median["direct"]
    table = Table(title=f"Chat on {args.model}: medians of {args.rounds} rounds")
    columns = ("way", "TTFT", "/ direct", "tokens/s", "direct / ours", "CPU", "/ direct")
    for column in (*columns, "/ direct, paired", "tokens"):
        table.add_column(column, justify="right")
    for name, (ttft, rate, tokens, cpu) in median.items():
        table.add_row(
            name,
            f"{ttft * 1000:.1f} ms",
            f"{ttft / ttft0:.2f}x",
            f"{rate:.0f}",
            f"{rate0 / rate:.2f}x",
            f"{cpu * 1000:.0f} ms",
            f"{cpu / cpu0:.2f}x",
            f"{paired[name]:.2f}x",
            f"{tokens:.0f}",
        )
    Console(width=140).print(table)
    ways = ("direct", "direct, traced", "using(), in a thread", "engine", "app (HTTP)")
    steps = (
        "recording the routing",
        "using() and a worker thread",
        "the engine's streaming (stop check, streamer, frames, decoding)",
        "Gradio and HTTP",
    )
    per_token = cpu0 / median["direct"][2] * 1000
    for step, before, after in zip(steps, ways, ways[1:], strict=False):
        extra = (paired[after] - paired[before]) * per_token
        print(f"extra CPU per token for {step}: {extra:.2f} ms (paired)")
    session = (paired["app (HTTP), new session"] - paired["app (HTTP)"]) * cpu0 * 1000
    print(f"extra CPU per answer for a new session: {session:.1f} ms (paired)")
    gradio = (paired["app (HTTP)"] - paired["engine"]) * cpu0 * 1000
    floor = median["Gradio alone (replay)"][3] * 1000
    print(f"the app's CPU per answer over the engine's: {gradio:.1f} ms (paired); Gradio alone")
    print(f"  streaming the same updates with no model: {floor:.1f} ms")
    print(f"direct: {per_token:.2f} ms CPU per token")
    print(f"torch {torch.__version__}, {args.threads} thread(s); {Path(__file__).name}")


def report_threads(split: dict[str, list[dict[str, float]]]) -> None:
    """Where each way's CPU goes, by group of threads (means over the rounds, in ms)."""
    table = Table(title="CPU per answer by thread (means, ms)")
    for column in ("way", *ThreadCPU.GROUPS, "all"):
        table.add_column(column, justify="right")
    for name in ("direct", "engine", "app (HTTP)", "Gradio alone (replay)"):
        means = [statistics.fmean(run[group] for run in split[name]) for group in ThreadCPU.GROUPS]
        table.add_row(name, *(f"{m * 1000:.1f}" for m in means), f"{sum(means) * 1000:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
