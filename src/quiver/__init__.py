"""Quiver: a registry and router for modular LLMs built from libraries of LoRA experts."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from quiver.errors import QuiverError

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


__all__ = ["QuiverError", "__version__", *_LAZY_EXPORTS]
