"""pyproject.toml declares what the code imports directly, and nothing it does not (#11): a hard
dependency for the package's own imports, the test extra for the tests'."""

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).parents[1]
# Needed at run time, but imported by a dependency on our behalf.
NOT_IMPORTED = {
    "jinja2": "huggingface_hub's ModelCard.from_template",
    "python-multipart": "FastAPI's Form()",
}


def _name(distribution: str) -> str:
    return distribution.lower().replace("_", "-")


def imported_distributions(folder: Path) -> dict[str, str]:
    """Distribution -> one file importing it, for every third-party import under ``folder``."""
    provider = packages_distributions()
    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for top in {module.partition(".")[0] for module in modules}:
                for distribution in provider.get(top, []):
                    if top not in sys.stdlib_module_names and top != "quiver":
                        found.setdefault(_name(distribution), str(path.relative_to(ROOT)))
    return found


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    hard = {_name(Requirement(r).name) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    optional = {_name(Requirement(r).name) for reqs in extras.values() for r in reqs}
    return hard, optional - {_name(project["name"])}


def test_every_import_is_declared_and_every_dependency_imported():
    hard, optional = declared()
    package = imported_distributions(ROOT / "src" / "quiver")
    undeclared = {d: f for d, f in package.items() if d not in hard | optional}
    assert undeclared == {}, "imported by the package but not declared"
    assert hard - set(package) == set(NOT_IMPORTED), "declared but imported by nothing"
    tests = imported_distributions(ROOT / "tests")
    undeclared = {d: f for d, f in tests.items() if d not in hard | optional}
    assert undeclared == {}, "imported by the tests but not in the test extra"
