"""The house's layers (README, Development): which of Quiver's packages may import which.

Data flows Hub -> registry -> library -> router -> model -> app, and imports point the same way:
a package may import only the layers listed for it (and itself). The check reads every import in
the source, function-level ones included, so a lazy import cannot cross a layer unseen.
"""

import ast
from pathlib import Path

import quiver

SOURCE = Path(quiver.__file__).parent

# Foundations every layer may use.
_BASE = {"quiver", "quiver.errors", "quiver.home", "quiver.fs"}
ALLOWED: dict[str, set[str]] = {
    "quiver": {"quiver.routing", "quiver.registry"},  # the lazy public API
    "quiver.errors": set(),
    "quiver.home": set(),
    "quiver.fs": set(),
    "quiver.testing": set(),
    "quiver.store": set(),
    "quiver.server": {"quiver.store"},
    "quiver.registry": {"quiver.store"},
    "quiver.routing": {"quiver.registry", "quiver.store"},
    "quiver.training": {"quiver.routing", "quiver.registry", "quiver.store"},
    "quiver.toyworld": {"quiver.training", "quiver.routing", "quiver.registry", "quiver.store"},
    "quiver.app": {
        "quiver.toyworld",
        "quiver.training",
        "quiver.routing",
        "quiver.registry",
        "quiver.testing",
    },
    "quiver.cli": {
        "quiver.app",
        "quiver.toyworld",
        "quiver.training",
        "quiver.routing",
        "quiver.registry",
        "quiver.server",
        "quiver.store",
    },
}


def layer_of(module: str) -> str | None:
    """The longest layer name that ``module`` is, or lies in; None for third-party modules. A name
    taken from the top-level package's lazy API (``from quiver import route``) belongs to the
    package that defines it."""
    exporter = quiver._LAZY_EXPORTS.get(module.removeprefix("quiver."))
    if exporter is not None and module.startswith("quiver."):
        module = exporter
    candidates = [name for name in ALLOWED if module == name or module.startswith(name + ".")]
    return max(candidates, key=len, default=None)


def module_name(path: Path, source: Path) -> str:
    parts = path.relative_to(source.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, source: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved."""
    name = module_name(path, source)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def violations(source: Path = SOURCE) -> list[str]:
    found = []
    for path in sorted(source.rglob("*.py")):
        importer = module_name(path, source)
        own = layer_of(importer)
        assert own is not None, f"{importer} belongs to no layer: add it to ALLOWED"
        permitted = {own} | ALLOWED[own] | _BASE
        for imported in sorted(imports_of(path, source)):
            layer = layer_of(imported)
            if layer is not None and layer not in permitted:
                found.append(f"{importer} imports {imported} ({own} -> {layer})")
    return found


def test_imports_follow_the_layers():
    assert violations() == []


def _package_with_bad_registry_module(tmp_path, source: str):
    """A fake ``quiver`` package whose ``registry/bad.py`` holds ``source``."""
    fake = tmp_path / "quiver"
    (fake / "registry").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "registry" / "__init__.py").write_text("")
    (fake / "registry" / "bad.py").write_text(source)
    return fake


def test_the_check_sees_a_crossing(tmp_path):
    """A registry module importing routing (lazily, inside a function) is reported."""
    fake = _package_with_bad_registry_module(
        tmp_path, "def f():\n    from quiver.routing import route\n"
    )
    assert violations(fake) == [
        "quiver.registry.bad imports quiver.routing (quiver.registry -> quiver.routing)",
        "quiver.registry.bad imports quiver.routing.route (quiver.registry -> quiver.routing)",
    ]


def test_the_check_sees_a_crossing_through_the_lazy_api(tmp_path):
    """``from quiver import route`` in the registry is routing, whatever package it is read from."""
    fake = _package_with_bad_registry_module(tmp_path, "from quiver import route\n")
    assert violations(fake) == [
        "quiver.registry.bad imports quiver.route (quiver.registry -> quiver.routing)"
    ]
