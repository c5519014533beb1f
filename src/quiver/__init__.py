"""Quiver: a registry and router for modular LLMs built from libraries of LoRA experts."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from quiver.errors import QuiverError

if TYPE_CHECKING:  # what editors and type checkers see; at run time __getattr__ imports on use
    from quiver.registry import (
        Expert,
        Library,
        Registry,
        open_registry,
    )
    from quiver.routing import (
        ELREA,
        Arrow,
        Merge,
        Oracle,
        RoutedModel,
        RoutingTrace,
        Strategy,
        compute_arrow_prototypes,
        load_prototypes,
        route,
        save_prototypes,
    )

try:
    __version__ = version("lora-quiver")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

# The public API, imported on first use so that `import quiver` (and `quiver --help`) stays light.
_LAZY_EXPORTS: dict[str, str] = {
    "route": "quiver.routing",
    "RoutedModel": "quiver.routing",
    "Arrow": "quiver.routing",
    "Merge": "quiver.routing",
    "Oracle": "quiver.routing",
    "ELREA": "quiver.routing",
    "Strategy": "quiver.routing",
    "RoutingTrace": "quiver.routing",
    "compute_arrow_prototypes": "quiver.routing",
    "save_prototypes": "quiver.routing",
    "load_prototypes": "quiver.routing",
    "Registry": "quiver.registry",
    "Expert": "quiver.registry",
    "Library": "quiver.registry",
    "open_registry": "quiver.registry",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'quiver' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)


# Spelled out (not built from _LAZY_EXPORTS) so linters and editors can read it.
__all__ = [
    "ELREA",
    "Arrow",
    "Expert",
    "Library",
    "Merge",
    "Oracle",
    "QuiverError",
    "Registry",
    "RoutedModel",
    "RoutingTrace",
    "Strategy",
    "__version__",
    "compute_arrow_prototypes",
    "load_prototypes",
    "open_registry",
    "route",
    "save_prototypes",
]
