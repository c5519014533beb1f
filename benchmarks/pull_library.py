"""Pull a 64-expert library from the self-hosted Hub with 100 ms injected per request.

Peer: a sequential loop of ``PeftModel.from_pretrained`` calls, the way one loads experts with
plain PEFT. Ours: ``Library.pull`` (concurrent downloads, every sha256 verified). Both start from an
empty Hugging Face cache on every run; the script prints each side's median and the ratio.

    .venv/bin/python benchmarks/pull_library.py [--experts 64] [--latency-ms 100] [--repeats 3]
        [--bundled]    # experts stored in the library repo (experts/<name>), not in their own repos
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

SCRATCH = Path(tempfile.mkdtemp(prefix="quiver-bench-pull-"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# PEFT resolves repos through the global endpoint, frozen when huggingface_hub is imported.
PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{PORT}"
os.environ["HF_HOME"] = str(SCRATCH / "hf-home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from peft import PeftModel  # noqa: E402
from tqdm import tqdm  # noqa: E402

from quiver.registry import HubRegistry, Library  # noqa: E402
from quiver.server import HubServer  # noqa: E402
from quiver.testing import make_random_expert, tiny_model  # noqa: E402

USER = "bench"
LIBRARY = f"{USER}/library"


def publish(endpoint: str, token: str, experts: int, *, bundled: bool) -> list[dict[str, str]]:
    """Publish a library of ``experts`` experts (bundled, or each in its own repo); return what
    ``PeftModel.from_pretrained`` needs to load each one."""
    hub = HubRegistry(endpoint, token=token, cache_dir=SCRATCH / "setup-cache")
    model = tiny_model("llama")
    library = Library.create(hub, LIBRARY, base_model=model.name_or_path)
    sources = []
    for index in tqdm(range(experts), desc="Publishing experts"):
        folder = make_random_expert(model, SCRATCH / "experts" / f"e{index}", rank=8, seed=index)
        if bundled:
            library.add(folder)
            sources.append({"model_id": LIBRARY, "subfolder": f"experts/e{index}"})
        else:
            hub.push(folder, f"{USER}/expert-{index}")
            library.add(f"{USER}/expert-{index}")
            sources.append({"model_id": f"{USER}/expert-{index}"})
    return sources


def pull_with_quiver(endpoint: str, run: int) -> float:
    hub = HubRegistry(endpoint, cache_dir=SCRATCH / f"quiver-cache-{run}")
    start = time.perf_counter()
    library = Library.pull(hub, LIBRARY, max_workers=16)
    elapsed = time.perf_counter() - start
    assert len(library.expert_paths()) == len(library.experts)
    return elapsed


def pull_with_peft(sources: list[dict[str, str]], run: int) -> float:
    bases = [tiny_model("llama") for _ in sources]  # built outside the timed loop
    cache_dir = SCRATCH / f"peft-cache-{run}"
    start = time.perf_counter()
    for base, source in zip(bases, sources, strict=True):
        PeftModel.from_pretrained(base, **source, cache_dir=cache_dir)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bundled", action="store_true")
    args = parser.parse_args()

    root = SCRATCH / "hub"
    with HubServer(root) as setup:  # no latency while publishing
        token = setup.create_token(USER)
        sources = publish(setup.endpoint, token, args.experts, bundled=args.bundled)

    ours, peers = [], []
    with HubServer(root, port=PORT, latency_ms=args.latency_ms) as hub:
        for run in range(args.repeats):
            ours.append(pull_with_quiver(hub.endpoint, run))
            peers.append(pull_with_peft(sources, run))
            print(f"run {run}: quiver {ours[-1]:.2f} s, sequential PEFT {peers[-1]:.2f} s")

    ours_median, peer_median = statistics.median(ours), statistics.median(peers)
    layout = "bundled" if args.bundled else "referenced"
    print(
        f"{args.experts} {layout} experts, {args.latency_ms:.0f} ms per request, "
        f"{args.repeats} runs: "
        f"Library.pull median {ours_median:.2f} s, sequential PeftModel.from_pretrained median "
        f"{peer_median:.2f} s, ratio {peer_median / ours_median:.1f}x"
    )


if __name__ == "__main__":
    main()
