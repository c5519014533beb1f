"""``quiver toyworld tasks | install``: thin over the toy world's API."""

from typer.testing import CliRunner

from quiver.cli import app
from quiver.registry import Library, LocalRegistry
from quiver.toyworld import DEMO_BASE_MODEL, DEMO_LIBRARY, HELD_OUT, TASKS


def quiver(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def test_tasks_lists_every_task_with_its_cluster_and_kind():
    result = quiver("toyworld", "tasks")
    assert result.exit_code == 0
    for task in (*TASKS, *HELD_OUT):
        assert task.name in result.stdout
    assert "paraphrase" in result.stdout and "new format" in result.stdout


def test_install_puts_the_demo_into_the_named_registry(tmp_path):
    result = quiver("toyworld", "install", "-r", tmp_path / "store")
    assert result.exit_code == 0, result.output
    assert DEMO_LIBRARY in result.stdout and DEMO_BASE_MODEL in result.stdout
    library = Library.open(LocalRegistry(tmp_path / "store"), DEMO_LIBRARY)
    assert library.manifest.base_model == DEMO_BASE_MODEL


def test_build_and_run_refuse_a_bad_output_or_base_before_any_work(tmp_path, monkeypatch):
    """`build -o` under a file ran the whole build (minutes) and then failed; `run --base` with
    a folder that holds no model was Hugging Face's repo-id complaint."""
    import quiver.toyworld.demo as demo
    import quiver.toyworld.pipeline as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("worked before checking the request")

    monkeypatch.setattr(demo, "build_libraries", no_work)
    monkeypatch.setattr(pipeline, "pretrain_base", no_work)
    (tmp_path / "file").write_text("not a folder")
    result = quiver("toyworld", "build", "-o", tmp_path / "file" / "demo")
    assert result.exit_code == 1
    assert "cannot write the demo into" in " ".join(result.stderr.split())
    result = quiver("toyworld", "run", "--reduced", "--base", tmp_path / "none", "-o", tmp_path)
    assert result.exit_code == 1
    assert "cannot load the base model" in " ".join(result.stderr.split())
    result = quiver("toyworld", "run", "--reduced", "--backend", "dask", "-o", tmp_path)
    assert result.exit_code == 1
    assert "unknown backend 'dask'" in " ".join(result.stderr.split())
