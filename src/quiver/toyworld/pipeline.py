"""The toy-world benchmark, end to end through Quiver's own code paths.

Pretrain (or reuse) the base model and check it copies; train one private expert per task
(``quiver.training``), check each masters its task; bundle them as a library; cluster them with MBC
and train one expert per cluster on the union of its tasks (``build_mbc_library``, which stores the
Arrow prototypes); build an ELREA library on all the tasks' examples pooled
(``build_elrea_library``: it clusters examples by their gradients, not tasks); train one shared
expert on every task; pull the libraries back from the registry; route (``quiver.routing``) and
score every method on the training and held-out tasks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sklearn.metrics import adjusted_rand_score
from transformers import PreTrainedModel

from quiver.errors import InvalidInputError, TrainingError
from quiver.registry import Library, Registry
from quiver.routing import ELREA, Arrow, route
from quiver.routing.base_model import push_base_model
from quiver.routing.elrea_artifact import stored_artifact
from quiver.toyworld.evaluate import Evaluation, TaskResult, evaluate
from quiver.toyworld.model import PretrainConfig, encode, pretrain_base, training_pairs
from quiver.toyworld.tasks import HELD_OUT, Task, copy_tasks, get_tasks
from quiver.training import TrainConfig, build_elrea_library, build_mbc_library, train_experts
from quiver.training import load_base as load_pretrained
from quiver.training.elrea import gradient_features
from quiver.training.fanout import BACKENDS
from quiver.training.trainer import torch_threads

NAMESPACE = "quiver-demo"
BASE_NAME, PRIVATE_NAME, MBC_NAME, SHARED_NAME, ELREA_NAME = (
    "toyworld-base",
    "toyworld-private",
    "toyworld",
    "toyworld-shared",
    "toyworld-elrea",
)
# What the toy world found routes the MBC library's prompts best (README, Toy world: the first
# block's scores pick the right cluster for 93% / 90% of training / held-out prompts, every
# block's for 41% / 47%; top-1, since a second expert's share garbles the answer), recorded in
# its manifest for tools such as the app to start from.
ARROW_ADVICE = {"arrow": {"granularity": "sequence", "prompt_layers": [0], "top_k": 1}}
ELREA_STAGE = "ELREA: base adapter, gradient clusters, one expert per cluster"
ELREA_ROWS = {"all members": None, "top-1": 1}
T = TypeVar("T")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_backend() -> str:
    """Ray when it is installed: the experts train side by side, one per core, bit for bit the
    ones the local backend trains one after another."""
    return "ray" if importlib.util.find_spec("ray") is not None else "local"


@dataclass(frozen=True)
class RunConfig:
    """Everything that shapes a toy-world run; the defaults are the full benchmark."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    base: str | None = None  # a saved base model folder to start from instead of pretraining
    tasks: tuple[str, ...] | None = None  # training tasks (default: all sixteen)
    held_out: tuple[str, ...] | None = None  # default: every held-out task of their clusters
    expert_steps: int = 300
    cluster_steps: int = 400
    shared_steps: int | None = None  # default: as many as all cluster experts together
    rank: int = 2  # at rank 1, private experts of 'first'/'last' failed the 0.90 gate
    alpha: float = 4.0
    learning_rate: float = 4e-3
    batch_size: int = 32
    train_examples: int = 2000  # per task
    eval_examples: int = 200  # per task
    k: int | None = None  # MBC clusters (default: the number of designed clusters)
    embedding: str = "update"
    elrea_fit_examples: int = 5000  # ELREA's BIRCH fit (the paper's); the rest go to a centroid
    seed: int = 0
    backend: str = field(default_factory=default_backend)  # trains the experts: "local" or "ray"
    # Torch threads of the stages that run one at a time (base, shared expert, scoring). One:
    # beside other busy processes, 2 threads made pretraining 4.5-13x, scoring 1.5-6x slower.
    threads: int = 1
    base_gate: float = 0.95  # the base model copies at least this often
    expert_gate: float = 0.90  # every private expert's exact match on its own task

    def __post_init__(self) -> None:
        get_tasks(self.tasks)  # unknown names fail here, before any training
        get_tasks(self.held_out)
        for name in (
            "expert_steps",
            "cluster_steps",
            "train_examples",
            "eval_examples",
            "elrea_fit_examples",
        ):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"RunConfig.{name} must be at least 1")
        if self.backend not in BACKENDS:
            raise InvalidInputError(
                f"unknown backend {self.backend!r}", hint=f"use one of {', '.join(BACKENDS)}"
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise InvalidInputError(f"RunConfig.threads must be at least 1, got {self.threads!r}")

    @classmethod
    def reduced(cls, base: str | None = None, **changes: Any) -> RunConfig:
        """The test suite's run: two clusters of two tasks, from a saved base, scored on 60
        examples per task (the private experts' gate and the routing goals hold there too)."""
        options = dict(
            base=base,
            tasks=("numbers-each", "numbers-ends", "words-each", "words-ends"),
            expert_steps=200,
            cluster_steps=200,
            eval_examples=60,
            train_examples=1000,
            elrea_fit_examples=1000,
        )
        return cls(**{**options, **changes})

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_tasks(self) -> list[Task]:
        return get_tasks(self.tasks)

    def cluster_count(self) -> int:
        """MBC's and ELREA's k: ``k``, or the number of designed clusters."""
        return self.k or len({task.cluster for task in self.training_tasks()})

    def held_out_tasks(self) -> list[Task]:
        if self.held_out is not None:
            return get_tasks(self.held_out)
        clusters = {task.cluster for task in self.training_tasks()}
        return [task for task in HELD_OUT if task.cluster in clusters]

    def train_config(self, steps: int) -> TrainConfig:
        return TrainConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=0.0,
            target_modules=TARGET_MODULES,
            learning_rate=self.learning_rate,
            max_steps=steps,
            batch_size=self.batch_size,
        )


@dataclass
class Built:
    """What the building stages leave in the registry, and the loaded base model."""

    registry: Registry
    model: PreTrainedModel
    tokenizer: Any
    base_id: str
    private_id: str
    mbc_id: str
    elrea_id: str
    shared: Path | None = None  # the shared expert's folder, when it was asked for


class Stages:
    """Runs named stages with a progress line and a timing for each (stages may overlap)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.timings: dict[str, float] = {}
        self._started = itertools.count(1)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"[{next(self._started)}] {name}...")
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 1)
        self.say(f"    {name}: {self.timings[name]:.0f} s")

    def run(self, name: str, work: Callable[..., T], *args: Any) -> T:
        with self.stage(name):
            return work(*args)


def check_base(model: PreTrainedModel, tokenizer: Any, gate: float, examples: int = 100) -> float:
    """The base model's copy rate; ``TrainingError`` naming the gate when it is below ``gate``."""
    result = evaluate(model, tokenizer, copy_tasks(), examples=examples)
    rate = result.mean()
    if rate < gate:
        each = ", ".join(f"{r.task} {r.exact_match:.2f}" for r in result.results)
        raise TrainingError(
            f"gate 'base copies' failed: the base model copies {rate:.1%} of inputs exactly "
            f"({each}), below {gate:.0%}",
            hint="pretrain longer (PretrainConfig.steps) before judging any routing",
        )
    return rate


def check_experts(own: Evaluation, gate: float) -> None:
    """``TrainingError`` naming every private expert below ``gate`` on its own task."""
    weak = [r for r in own.select(held_out=False) if r.exact_match < gate]
    if weak:
        listed = ", ".join(f"{r.task} {r.exact_match:.2f}" for r in weak)
        raise TrainingError(
            f"gate 'private experts' failed: {listed} below {gate:.0%} exact match on their "
            "own task",
            hint="train the private experts longer (expert_steps) before judging any routing",
            expert=weak[0].task,
        )


def load_base(base: str | Path) -> tuple[PreTrainedModel, Any]:
    """A saved base model and its tokenizer; one that cannot be loaded is a typed error."""
    model, tokenizer = load_pretrained(str(base))
    return model.eval(), tokenizer


def build_libraries(
    config: RunConfig, registry: Registry, stages: Stages, *, shared_dir: Path | None = None
) -> Built:
    """The building half of a run: base, private experts, MBC library, ELREA library, and with
    ``shared_dir`` the shared expert, written there. The experts train on ``config.backend`` with
    one thread each; the rest with ``config.threads``. Once the private experts pass their gate,
    the MBC library, the ELREA library and the shared expert build side by side on Ray (one
    after another locally): Ray hands every expert to a free core, and each expert is the same
    bit for bit as when trained alone."""
    with torch_threads(config.threads):
        return _build_libraries(config, registry, stages, shared_dir)


def _build_libraries(
    config: RunConfig, registry: Registry, stages: Stages, shared_dir: Path | None
) -> Built:
    with stages.stage("base model"):
        if config.base is None:
            model, tokenizer = pretrain_base(config.pretrain)
        else:
            model, tokenizer = load_base(config.base)
        check_base(model, tokenizer, config.base_gate)
        base_id = f"{NAMESPACE}/{BASE_NAME}"
        model.name_or_path = model.config._name_or_path = base_id  # what the experts' cards name
        push_base_model(registry, base_id, model, tokenizer, message="Toy-world base model")
    tasks = config.training_tasks()
    data = {
        t.name: training_pairs(tokenizer, t.examples(config.train_examples, seed=config.seed))
        for t in tasks
    }
    independent = {ELREA_STAGE: partial(build_elrea, config, registry, model, tokenizer, data)}
    if shared_dir is not None:
        independent["shared expert"] = partial(
            train_shared, config, model, tokenizer, data, shared_dir
        )
    with tempfile.TemporaryDirectory(prefix="quiver-toyworld-") as scratch:
        with stages.stage(f"{len(tasks)} private experts"):
            private = _train_private(config, registry, model, tokenizer, data, Path(scratch))
        with stages.stage("private experts' gate"):
            check_experts(
                oracle_evaluation(model, tokenizer, private, tasks, config), config.expert_gate
            )
    # Side by side only on Ray: local training in threads would share torch's global random
    # state, and the experts would depend on the threads' timing.
    side_by_side = config.backend == "ray"
    with ThreadPoolExecutor(len(independent)) as pool:
        # One worker each: all start at once (an error of MBC's waits for them to finish).
        started = {
            name: pool.submit(stages.run, name, work)
            for name, work in independent.items()
            if side_by_side
        }
        with stages.stage("MBC clusters and one expert per cluster"):
            mbc = build_mbc_library(
                private,
                registry,
                f"{NAMESPACE}/{MBC_NAME}",
                k=config.cluster_count(),
                embedding=config.embedding,
                seed=config.seed,
                data=data,
                base_model=model,
                tokenizer=tokenizer,
                config=config.train_config(config.cluster_steps),
                backend=config.backend,
            )
        done = {
            name: started[name].result() if name in started else stages.run(name, work)
            for name, work in independent.items()
        }
    elrea_id = done[ELREA_STAGE].repo_id
    mbc.set_routing(
        {**ARROW_ADVICE, "elrea": {"library": elrea_id}},
        message="Routing advice: Arrow per sequence at the first block; ELREA over " + elrea_id,
    )
    return Built(
        registry,
        model,
        tokenizer,
        base_id,
        private.repo_id,
        mbc.repo_id,
        elrea_id,
        done.get("shared expert"),
    )


def build_elrea(config: RunConfig, registry: Registry, model, tokenizer, data) -> Library:
    """ELREA on every training task's examples pooled: a base adapter, then ``k`` experts
    continuing from it, each trained as long as an MBC expert (``cluster_steps``, like the base
    adapter: ELREA's cost is ``k + 1`` such trainings)."""
    return build_elrea_library(
        [pair for pairs in data.values() for pair in pairs],
        registry,
        f"{NAMESPACE}/{ELREA_NAME}",
        base_model=model,
        tokenizer=tokenizer,
        k=config.cluster_count(),
        config=config.train_config(config.cluster_steps),
        fit_examples=config.elrea_fit_examples,
        feature_batch_size=32,
        seed=config.seed,
        backend=config.backend,
    )


@dataclass(frozen=True)
class ElreaClusters:
    """ELREA's example clusters on a sample of the training examples, against the designed ones."""

    members: dict[str, dict[str, int]]  # expert -> how many of each task's examples it holds
    adjusted_rand: float  # against the designed clusters

    def expert_clusters(self, tasks: Sequence[Task]) -> dict[str, str]:
        """Each expert's designed cluster: that of more than half of its examples (an expert
        without one, e.g. holding one format of every cluster, serves none)."""
        designed = {task.name: task.cluster for task in tasks}
        out: dict[str, Counter] = {}
        for expert, counts in self.members.items():
            for task, count in counts.items():
                out.setdefault(expert, Counter())[designed[task]] += count
        return {
            expert: cluster
            for expert, counts in out.items()
            for cluster, count in counts.items()
            if count > counts.total() / 2
        }


def elrea_clusters(
    model, tokenizer, library: Library, tasks: Sequence[Task], config: RunConfig, per_task: int
) -> ElreaClusters:
    """ELREA's clusters of the first ``per_task`` training examples of each task: each example
    in the cluster of the nearest centroid by cosine (the build's rule for examples beyond its
    fit; the build does not store its labels)."""
    artifact = stored_artifact(library)
    experts = [name for name in artifact.expert_names if name != artifact.base_expert]
    centroids = artifact.centroids[[artifact.expert_names.index(name) for name in experts]]
    sample = [(t, e) for t in tasks for e in t.examples(per_task, seed=config.seed)]
    features = gradient_features(
        model,
        library.expert_paths()[artifact.base_expert],
        [encode(tokenizer, example)[0] for _, example in sample],
        artifact.projection,
        pad_id=tokenizer.pad_token_id,
        batch_size=32,
    )
    nearest = [experts[i] for i in (features @ centroids.T).argmax(1).tolist()]
    members: dict[str, Counter] = {expert: Counter() for expert in experts}
    for expert, (task, _) in zip(nearest, sample, strict=True):
        members[expert][task.name] += 1
    designed = [task.cluster for task, _ in sample]
    return ElreaClusters(
        {e: dict(c) for e, c in members.items()}, adjusted_rand_score(designed, nearest)
    )


def _train_private(config, registry, model, tokenizer, data, scratch: Path) -> Library:
    results = train_experts(
        model,
        data,
        config=config.train_config(config.expert_steps),
        seed=config.seed,
        tokenizer=tokenizer,
        output_dir=scratch / "private",
        backend=config.backend,
    )
    failed = [f"{r.name}: {r.error}" for r in results if not r.ok]
    if failed:
        raise TrainingError("private experts failed to train: " + "; ".join(failed))
    return Library.create(
        registry,
        f"{NAMESPACE}/{PRIVATE_NAME}",
        base_model=model.name_or_path,
        description="One private expert per toy-world task.",
        experts={result.name: result.expert for result in results},
    )


def oracle_evaluation(
    model, tokenizer, library: Library, tasks: Sequence[Task], config: RunConfig
) -> Evaluation:
    """Each task scored with its own expert (by task name, or by the cluster holding it)."""
    owners = task_owners(library)
    routed = route(model, library, "oracle")
    try:
        oracle = {task.name: owners[task.name] for task in tasks}
        return evaluate(
            routed, tokenizer, tasks, examples=config.eval_examples, seed=config.seed, oracle=oracle
        )
    finally:
        routed.unroute()


def task_owners(library: Library) -> dict[str, str]:
    """Task name -> the library's expert trained on it (MBC libraries record their clusters)."""
    build = library.manifest.build or {}
    owners = {name: name for name in library.names}
    for cluster, tasks in build.get("tasks", {}).items():
        owners.update(dict.fromkeys(tasks, cluster))
    return owners


def expert_clusters(library: Library, tasks: Sequence[Task]) -> dict[str, str]:
    """Each expert's designed cluster: its task's, or the majority of the tasks it was built on."""
    designed = {task.name: task.cluster for task in tasks}
    out = {}
    for task, expert in task_owners(library).items():
        out.setdefault(expert, []).append(designed.get(task))
    return {e: max(set(cs), key=cs.count) for e, cs in out.items() if any(cs)}


def adjusted_rand(library: Library, tasks: Sequence[Task]) -> float:
    """How well MBC's clusters match the designed ones (1.0: the same partition)."""
    owners = task_owners(library)
    return adjusted_rand_score([t.cluster for t in tasks], [owners[t.name] for t in tasks])


def best_single(
    model, tokenizer, library: Library, tasks: Sequence[Task], config: RunConfig
) -> list[TaskResult]:
    """For each task, the result of the library's best single expert on it (held-out oracle)."""
    routed = route(model, library, "oracle")
    try:
        best: dict[str, TaskResult] = {}
        for expert in library.names:
            oracle = {task.name: expert for task in tasks}
            scored = evaluate(
                routed, tokenizer, tasks, examples=config.eval_examples, oracle=oracle
            )
            for result in scored.results:
                if result.task not in best or _better(result, best[result.task]):
                    best[result.task] = result
    finally:
        routed.unroute()
    return [best[task.name] for task in tasks]


def _better(a: TaskResult, b: TaskResult) -> bool:
    return (a.exact_match, -a.answer_nll) > (b.exact_match, -b.answer_nll)


def train_shared(config: RunConfig, model, tokenizer, data, output_dir: Path) -> Path:
    """One expert on every training task's ``data`` together, with the compute of the whole MBC
    library (on Ray, in a worker with one thread; locally, here with ``config.threads``)."""
    steps = config.shared_steps or config.cluster_steps * config.cluster_count()
    (result,) = train_experts(
        model,
        {SHARED_NAME: data},
        config=config.train_config(steps),
        seed=config.seed,
        tokenizer=tokenizer,
        output_dir=output_dir,
        backend=config.backend,
        cpus_per_expert=1 if config.backend == "ray" else config.threads,
    )
    if not result.ok:
        raise TrainingError(f"the shared expert failed to train: {result.error}")
    return result.path


def method_list(
    libraries: dict[str, Library], template_ids: Sequence[int], instruction_ids: Sequence[int]
) -> list[tuple[str, str, Any]]:
    """``(method, library, strategy)`` for every routed row of the table. Arrow per sequence
    scores the whole prompt (the issue's definition), and, top-1, the prompt without the chat
    template's tokens (``template_ids``), or its inputs alone (``instruction_ids`` ignored too),
    or the whole prompt, or its inputs alone, at the first block's modules only
    (``prompt_layers``)."""
    leave_out = {"chat template ignored": template_ids, "inputs only": instruction_ids}
    rows = []
    for label, library in libraries.items():
        if label == "ELREA":  # the paper's ensemble of all members, and its top-1 variant
            rows += [(f"ELREA, {n}", label, ELREA(top_k=k)) for n, k in ELREA_ROWS.items()]
            continue
        count = len(library.names)
        rows.append(("uniform merge (mu)", label, "uniform"))
        rows += [
            (f"Arrow per token, top-{k}", label, Arrow(top_k=k)) for k in (1, 2, 4) if k <= count
        ]
        rows += [
            (f"Arrow per sequence, top-{k}", label, Arrow(top_k=k, granularity="sequence"))
            for k in (1, 2)
            if k <= count
        ]
        rows += [
            (
                f"Arrow per sequence, top-1, {name}",
                label,
                Arrow(top_k=1, granularity="sequence", ignore_token_ids=tuple(ids)),
            )
            for name, ids in leave_out.items()
        ]
        rows += [
            (
                f"Arrow per sequence, top-1, first block{suffix}",
                label,
                Arrow(top_k=1, granularity="sequence", prompt_layers=(0,), ignore_token_ids=ids),
            )
            for suffix, ids in (("", ()), (", inputs only", tuple(instruction_ids)))
        ]
    return rows
