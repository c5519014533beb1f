"""Quiver: a registry and router for modular LLMs built from libraries of LoRA experts."""

from importlib.metadata import PackageNotFoundError, version

from quiver.errors import QuiverError

try:
    __version__ = version("lora-quiver")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["QuiverError", "__version__"]
