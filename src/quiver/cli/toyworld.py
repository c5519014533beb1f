"""``quiver toyworld ...``: the CPU benchmark where routing must honestly help, and its demo."""

from __future__ import annotations

from pathlib import Path

import typer

from quiver.cli._common import RegistryOption, TokenOption, console, registry_from

toyworld_app = typer.Typer(help="The toy world: a CPU routing benchmark and the demo library.")
toyworld_app.info.no_args_is_help = True


@toyworld_app.command("tasks")
def tasks() -> None:
    """List the toy world's tasks: cluster, kind and an example."""
    from rich.table import Table

    from quiver.toyworld import HELD_OUT, TASKS

    table = Table("task", "cluster", "kind", "example prompt", "answer")
    for task in (*TASKS, *HELD_OUT):
        example = task.examples(1, split="eval")[0]
        table.add_row(task.name, task.cluster, task.kind, example.prompt, example.answer)
    console.print(table)


@toyworld_app.command("run")
def run(
    output: Path = typer.Option(Path("toyworld-results"), "--output", "-o", help="Where to save."),
    reduced: bool = typer.Option(False, help="A few minutes' run from the prebuilt base model."),
    base: Path | None = typer.Option(None, help="Start from this saved base model folder."),
    seed: int = typer.Option(0, help="Seeds the data, the base model and every expert."),
    backend: str | None = typer.Option(
        None,
        help="Train the experts one after another (local) or side by side on a local Ray (ray); "
        "the same experts either way. Default: ray when it is installed.",
    ),
    threads: int = typer.Option(
        1,
        help="Torch threads of the stages that run one at a time (base model, scoring): 2 may "
        "help on an idle machine, and is much slower beside other busy processes.",
    ),
    registry: str | None = typer.Option(
        None, "--registry", "-r", help="Where to push the libraries (default: OUTPUT/registry)."
    ),
    token: str | None = TokenOption,
) -> None:
    """Run the benchmark; print the table and save results.json, results.md, results.png."""
    from quiver.toyworld import DEMO_FOLDER, RunConfig, run_benchmark

    options = dict(seed=seed, threads=threads, **({"backend": backend} if backend else {}))
    if reduced:
        config = RunConfig.reduced(base=str(base or DEMO_FOLDER / "base"), **options)
    else:
        config = RunConfig(base=str(base) if base else None, **options)
    target = registry_from(registry, token, create=True) if registry else None
    run_benchmark(config, output, registry=target, say=console.print)


@toyworld_app.command("build")
def build(
    output: Path | None = typer.Option(None, "--output", "-o", help="Default: the package's."),
    seed: int = typer.Option(0, help="Seeds the data, the base model and every expert."),
) -> None:
    """Regenerate the prebuilt demo library (base model, cluster experts, Arrow prototypes)."""
    import torch

    from quiver.toyworld import DEMO_FOLDER, RunConfig, build_demo

    torch.set_num_threads(1)
    # One thread, as the shipped demo was built: pretraining's sums depend on the thread count.
    build_demo(RunConfig(seed=seed, threads=1), output or DEMO_FOLDER, say=console.print)


@toyworld_app.command("install")
def install(registry: str | None = RegistryOption, token: str | None = TokenOption) -> None:
    """Install the prebuilt demo library and its base model into a registry."""
    from quiver.toyworld import DEMO_BASE_MODEL, install_demo

    library = install_demo(registry_from(registry, token, create=True))
    console.print(f"{library} (base model {DEMO_BASE_MODEL})")
