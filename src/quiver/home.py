"""Where Quiver keeps its files on this machine: one neutral place that every layer may ask."""

from __future__ import annotations

import os
from pathlib import Path


def quiver_home() -> Path:
    """``$QUIVER_HOME``, or ``~/.cache/quiver``: the local registry, compiled kernels, demo data."""
    return Path(os.environ.get("QUIVER_HOME") or Path.home() / ".cache" / "quiver")
