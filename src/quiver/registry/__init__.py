"""The registry: publish and pull LoRA experts and libraries, locally or on any Hub endpoint."""

from quiver.home import quiver_home
from quiver.registry.base import Registry, RepoSummary, Version
from quiver.registry.card import ExpertCard
from quiver.registry.expert import Expert, read_card
from quiver.registry.hub import HubRegistry, open_registry
from quiver.registry.library import ExpertPin, Library, LibraryManifest
from quiver.registry.local import LocalRegistry

__all__ = [
    "Expert",
    "ExpertCard",
    "ExpertPin",
    "HubRegistry",
    "Library",
    "LibraryManifest",
    "LocalRegistry",
    "Registry",
    "RepoSummary",
    "Version",
    "open_registry",
    "quiver_home",
    "read_card",
]
