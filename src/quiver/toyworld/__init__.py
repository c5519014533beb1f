"""The toy world: a CPU benchmark where routing must honestly help, and Quiver's demo library.

- ``TASKS``/``HELD_OUT``/``get_tasks``: seeded synthetic instruction tasks in four input-domain
  clusters; ``Task`` to add your own.
- ``pretrain_base``: the tiny word-level Llama the tasks are learned on.
- ``evaluate``: exact match, token accuracy and answer NLL of any model on any tasks, with routing
  diagnostics for a routed model.
- ``run_benchmark``: the whole comparison (``quiver toyworld run``).
- ``install_demo``: the prebuilt demo library, installed into a registry on first use.
"""

from quiver.toyworld.benchmark import Results, Row
from quiver.toyworld.benchmark import run as run_benchmark
from quiver.toyworld.demo import (
    DEMO_BASE_MODEL,
    DEMO_ELREA_LIBRARY,
    DEMO_FOLDER,
    DEMO_LIBRARY,
    build_demo,
    install_demo,
)
from quiver.toyworld.evaluate import Evaluation, LayerRouting, TaskResult, evaluate
from quiver.toyworld.model import PretrainConfig, build_tokenizer, pretrain_base
from quiver.toyworld.pipeline import RunConfig
from quiver.toyworld.tasks import (
    CLUSTERS,
    DOMAINS,
    HELD_OUT,
    TASKS,
    Domain,
    Example,
    Task,
    get_tasks,
)

__all__ = [
    "CLUSTERS",
    "DEMO_BASE_MODEL",
    "DEMO_ELREA_LIBRARY",
    "DEMO_FOLDER",
    "DEMO_LIBRARY",
    "DOMAINS",
    "HELD_OUT",
    "TASKS",
    "Domain",
    "Evaluation",
    "Example",
    "LayerRouting",
    "PretrainConfig",
    "Results",
    "Row",
    "RunConfig",
    "Task",
    "TaskResult",
    "build_demo",
    "build_tokenizer",
    "evaluate",
    "get_tasks",
    "install_demo",
    "pretrain_base",
    "run_benchmark",
]
