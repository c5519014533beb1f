"""Train many experts in one call: one per task or per cluster, one after another or on Ray.

All data is read, tokenised and checked by the caller before any training starts, so bad input
fails at once and the workers receive token ids only (a cluster's machines share no filesystem).
Each expert trains with ``cpus_per_expert`` torch threads on either backend, so the same seeds give
the same weights bit for bit. A worker pushes its expert to ``registry`` when one is named (the
only way home from a remote machine) and reports the repo id and commit; a failed expert is
reported with its error while the others finish.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from quiver.errors import ConnectionFailedError, QuiverError, TrainingError
from quiver.registry import Expert, Registry
from quiver.store import check_name, check_repo_id
from quiver.training.data import DataSource
from quiver.training.trainer import (
    AdapterInit,
    TrainConfig,
    TrainingData,
    check_output_dir,
    context_length,
    from_pretrained,
    load_base,
    load_tokenizer,
    prepare_data,
    train_prepared,
)

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class TrainResult:
    """How one expert of a ``train_experts`` call ended: where it is, or why it failed."""

    name: str
    path: Path | None = None  # on the machine that trained it
    repo_id: str | None = None  # when pushed
    commit: str | None = None
    sha256: str | None = None  # of the weights
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def expert(self) -> Expert:
        """The trained expert, read from ``path`` (pull ``repo_id`` when it trained elsewhere)."""
        if self.error is not None:
            raise TrainingError(f"expert {self.name!r} failed: {self.error}", expert=self.name)
        if self.path is None or not self.path.is_dir():
            raise TrainingError(
                f"expert {self.name!r} was trained on another machine",
                hint=f"pull {self.repo_id} from the registry it was pushed to",
                expert=self.name,
            )
        return Expert.from_folder(self.path, repo_id=self.repo_id, commit=self.commit)


@dataclass(frozen=True)
class _Job:
    name: str
    data: TrainingData
    folder: Path | None
    repo_id: str | None


def _run_job(
    job: _Job,
    base_model: Any,
    tokenizer: Any,
    config: TrainConfig,
    seed: int,
    registry: Registry | None,
    init: AdapterInit | None = None,
) -> TrainResult:
    """Train one expert (in this process or a Ray worker); never raise, report."""
    try:
        model, tokenizer = load_base(base_model, tokenizer)
        folder = job.folder or Path(tempfile.mkdtemp(prefix=f"quiver-{job.name}-"))
        folder.mkdir(parents=True, exist_ok=True)
        expert = train_prepared(
            model, tokenizer, job.data, config, seed=seed, folder=folder, init=init
        )
        if registry is not None:
            expert = registry.push(expert, job.repo_id)
        return TrainResult(job.name, folder, expert.repo_id, expert.commit, expert.weights_sha256)
    except Exception as error:  # report it: one expert's failure must not stop the others
        return _failed(job.name, error)


def _failed(name: str, error: Exception) -> TrainResult:
    detail = str(error) if isinstance(error, QuiverError) else traceback.format_exc(limit=3)
    return TrainResult(name, error=f"{type(error).__name__}: {detail}".strip())


# In a Ray worker: the base model of the call being served, loaded by its first job there.
_worker_base: dict[str, tuple[Any, Any]] = {}


def _run_ray_job(job: _Job, call: str, base: list, tokenizer: Any, *shared: Any) -> TrainResult:
    """``_run_job`` in a Ray worker, which loads call ``call``'s base model once for all the
    jobs it serves (a worker trains several experts one after another): ``base`` holds the
    model's object ref (in a list, so that Ray hands the ref over unresolved) or its id."""
    if call not in _worker_base:
        import ray

        _worker_base.clear()  # one base at a time: a worker outlives the calls it serves
        try:
            source = ray.get(base[0]) if isinstance(base[0], ray.ObjectRef) else base[0]
            _worker_base[call] = load_base(source, tokenizer)
        except Exception as error:
            return _failed(job.name, error)
    return _run_job(job, *_worker_base[call], *shared)


def _check_reachable(address: str) -> None:
    """Refuse a ``host:port`` (or ``ray://host:port``) nobody answers on, before Ray waits."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray resolves these itself
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise ConnectionFailedError(
            f"cannot reach the Ray cluster at {address} ({error})",
            hint="start it with `ray start --head`, or check the address and the firewall",
        ) from error


def _start_ray(address: str | None, num_cpus: int | None):
    """Connect to the Ray cluster at ``address``, or start a local one with ``num_cpus`` CPUs
    (default: all), unless Ray is up already; returns the ``ray`` module.

    A local Ray only from the main thread: the processes Ray starts die with the thread that
    started them (a Ray started in a worker thread is gone once that thread ends)."""
    try:
        import ray
    except ImportError as error:
        raise TrainingError(
            "the ray backend needs Ray", hint="pip install 'lora-quiver[ray]'"
        ) from error
    if ray.is_initialized():
        return ray
    if address is None and threading.current_thread() is not threading.main_thread():
        raise TrainingError(
            "a local Ray must be started from the main thread: the processes it starts die "
            "with the thread that started them",
            hint="call ray.init() in the main thread first",
        )
    try:
        ray.init(
            address=address,
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except ConnectionError as error:
        raise ConnectionFailedError(f"cannot connect to Ray at {address}: {error}") from error
    return ray


def _run_on_ray(jobs, base_model, tokenizer, config, seed, registry, init, options, progress):
    """One Ray task per expert, ``config.num_threads`` CPUs each. The base model travels once:
    a loaded one through the object store, an id as text; each worker loads it once."""
    ray = _start_ray(options["address"], options["num_cpus"])
    train = ray.remote(num_cpus=config.num_threads, max_retries=0)(_run_ray_job)
    base = [str(base_model) if isinstance(base_model, (str, Path)) else ray.put(base_model)]
    shared = [ray.put(value) for value in (tokenizer, config, seed, registry, init)]
    call = uuid.uuid4().hex
    pending = {train.remote(job, call, base, *shared): job.name for job in jobs}
    results = {}
    with tqdm(total=len(jobs), desc="Training experts", unit="expert", disable=not progress) as bar:
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready)
            try:
                results[name] = ray.get(ready)
            except Exception as error:  # the worker itself died
                results[name] = TrainResult(name, error=f"{type(error).__name__}: {error}")
            bar.update()
    return [results[job.name] for job in jobs]


def train_experts(
    base_model: Any,
    data: Mapping[str, DataSource | Mapping[str, DataSource]],
    *,
    config: TrainConfig | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    eval_data: Mapping[str, DataSource] | None = None,
    backend: str = "local",
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_expert: int = 1,
    registry: Registry | None = None,
    namespace: str | None = None,
    output_dir: str | Path | None = None,
    progress: bool | None = None,
    init_adapter: str | Path | Expert | None = None,
) -> list[TrainResult]:
    """Train one expert per entry of ``data`` (``name -> source``, or ``name -> {task: source}``
    for a cluster's union of tasks) and report each, in order.

    ``backend="ray"`` runs them on Ray: the cluster at ``address`` (``ray.init(address=...)``),
    else a local Ray with ``num_cpus`` CPUs (default: all). Every expert gets ``cpus_per_expert``
    CPUs and as many torch threads, on both backends. With ``registry``, each expert is pushed as
    ``namespace/name`` by whoever trained it (required on a remote cluster); otherwise it is written
    to ``output_dir/name`` (default: a temporary folder). ``base_model`` is a Hub id or folder every
    worker can load, or a loaded model (sent to the workers through Ray's object store).
    ``init_adapter`` (a PEFT LoRA folder or ``Expert``, read here and sent to the workers as
    tensors) makes every expert continue training that adapter instead of a fresh LoRA.
    """
    if backend not in BACKENDS:
        raise TrainingError(f"unknown backend {backend!r}", hint=f"use one of {BACKENDS}")
    _check_names(data, eval_data, registry, namespace)
    if backend == "ray" and address is not None and registry is None:
        raise TrainingError(
            "a Ray cluster's workers share no filesystem with you",
            hint="name a registry (and namespace) that the workers push the experts to",
        )
    if backend == "ray" and address is not None:
        _check_reachable(address)
    config = dataclasses.replace(config or TrainConfig(), num_threads=cpus_per_expert)
    jobs = _prepare_jobs(base_model, data, config, tokenizer, eval_data, namespace, output_dir)
    init = AdapterInit.read(init_adapter) if init_adapter is not None else None
    progress = sys.stderr.isatty() if progress is None else progress
    if backend == "ray":
        options = {"address": address, "num_cpus": num_cpus}
        return _run_on_ray(
            jobs, base_model, tokenizer, config, seed, registry, init, options, progress
        )
    model, tokenizer = load_base(base_model, tokenizer)  # loaded once for all experts
    results = []
    for job in tqdm(jobs, desc="Training experts", unit="expert", disable=not progress):
        results.append(_run_job(job, model, tokenizer, config, seed, registry, init))
    return results


def _check_names(data, eval_data, registry, namespace) -> None:
    """Every expert's name (its folder, its repo) and target, before any work."""
    if not isinstance(data, Mapping) or not data:
        raise TrainingError("no experts to train", hint="map each expert's name to its data")
    for name in data:
        check_name(name, "expert name")
    unknown = sorted(set(eval_data or {}) - set(data))
    if unknown:
        raise TrainingError(
            f"eval data for experts that are not trained: {', '.join(unknown)}",
            hint=f"name eval data after the experts: {', '.join(data)}",
        )
    if registry is None:
        return
    if namespace is None:
        raise TrainingError("pushing needs a namespace", hint="pass namespace='user-or-org'")
    repo_ids = [check_repo_id(f"{namespace}/{name}") for name in data]
    registry.check_can_push(repo_ids[0])  # one namespace: a dead or refusing registry fails now


def _prepare_jobs(base_model, data, config, tokenizer, eval_data, namespace, output_dir):
    """Read, tokenise and check every expert's data here, before any training starts."""
    from transformers import AutoConfig

    if isinstance(base_model, (str, Path)):
        model_config = from_pretrained(AutoConfig, str(base_model), "base model")
        tokenizer = tokenizer or load_tokenizer(str(base_model))
    else:
        base_model, tokenizer = load_base(base_model, tokenizer)
        model_config = base_model.config
    limit = context_length(model_config, config)
    root = Path(output_dir) if output_dir is not None else None
    for name in data if root is not None else ():
        check_output_dir(root / name)
    jobs = []
    for name, source in data.items():
        try:
            prepared = prepare_data(
                source,
                tokenizer,
                max_length=limit,
                task=None if isinstance(source, Mapping) else name,
                eval_data=(eval_data or {}).get(name),
            )
        except TrainingError as error:
            raise TrainingError(f"expert {name!r}: {error}", expert=name) from error
        repo_id = f"{namespace}/{name}" if namespace else None
        jobs.append(_Job(name, prepared, root / name if root else None, repo_id))
    return jobs
