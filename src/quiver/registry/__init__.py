"""The registry: publish and pull LoRA experts and libraries, locally or on any Hub endpoint.

Names are imported on first use, so that importing a subpackage (e.g. the self-hosted server in
``quiver.server``) does not pull in huggingface_hub and safetensors.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Registry": "quiver.registry.base",
    "RepoSummary": "quiver.registry.base",
    "Version": "quiver.registry.base",
    "ExpertCard": "quiver.registry.card",
    "Expert": "quiver.registry.expert",
    "ExpertPin": "quiver.registry.library",
    "Library": "quiver.registry.library",
    "LibraryManifest": "quiver.registry.library",
    "LocalRegistry": "quiver.registry.local",
    "quiver_home": "quiver.home",
    "HubRegistry": "quiver.registry.hub",
    "open_registry": "quiver.registry.hub",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quiver.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = list(_EXPORTS)
