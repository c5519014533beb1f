"""Concurrency of the self-hosted Hub: download a 64-file repo at 100 ms injected per request.

Peer: one client fetching the files one after the other (``hf_hub_download`` in a loop). Ours: the
same files through ``snapshot_download(max_workers=16)``, which only helps if the server overlaps
requests instead of queueing them. Both start from an empty cache on every run; the script prints
each side's median and the ratio.

    .venv/bin/python benchmarks/hub_server.py [--files 64] [--latency-ms 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from tqdm import tqdm

from quiver.server import HubServer

REPO = "bench/files"


def publish(api: HfApi, folder: Path, files: int) -> dict[str, bytes]:
    contents = {f"f{index:03d}.bin": os.urandom(4096) for index in range(files)}
    folder.mkdir(parents=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    api.create_repo(REPO)
    api.upload_folder(folder_path=folder, repo_id=REPO)
    return contents


def serial(endpoint: str, names: list[str], cache: Path) -> float:
    start = time.perf_counter()
    for name in names:
        hf_hub_download(REPO, name, cache_dir=cache, endpoint=endpoint)
    return time.perf_counter() - start


def concurrent(endpoint: str, cache: Path) -> float:
    start = time.perf_counter()
    snapshot_download(REPO, cache_dir=cache, endpoint=endpoint, max_workers=16)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="quiver-bench-hub-"))
    with HubServer(scratch / "root", latency_ms=args.latency_ms) as hub:
        api = HfApi(endpoint=hub.endpoint, token=hub.create_token("bench"))
        contents = publish(api, scratch / "files", args.files)
        names = sorted(contents)
        ours, peer = [], []
        for run in tqdm(range(args.repeats), desc="Runs"):
            ours.append(concurrent(hub.endpoint, scratch / f"ours-{run}"))
            peer.append(serial(hub.endpoint, names, scratch / f"peer-{run}"))
            snapshot = Path(
                snapshot_download(REPO, cache_dir=scratch / f"ours-{run}", endpoint=hub.endpoint)
            )
            assert all((snapshot / name).read_bytes() == data for name, data in contents.items())
    ours_median, peer_median = statistics.median(ours), statistics.median(peer)
    print(
        f"{args.files} files, {args.latency_ms:g} ms per request, {args.repeats} runs: "
        f"snapshot_download(max_workers=16) median {ours_median:.2f} s, "
        f"serial hf_hub_download median {peer_median:.2f} s, ratio {peer_median / ours_median:.1f}x"
    )


if __name__ == "__main__":
    main()
