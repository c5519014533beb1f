"""The knobs of a served Hub."""

from __future__ import annotations

from dataclasses import dataclass

from quiver.errors import InvalidInputError


@dataclass(frozen=True)
class HubOptions:
    """Server knobs. ``latency_ms`` delays every request (benchmarks only); files of at least
    ``lfs_threshold`` bytes are asked for through the legacy LFS transfer (clients with
    HF_HUB_DISABLE_XET=1; a client with Xet cannot upload them), smaller ones inline."""

    latency_ms: float = 0.0
    max_body_bytes: int = 1 << 30
    page_size: int = 100
    lfs_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise InvalidInputError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if self.max_body_bytes <= 0 or self.page_size <= 0:
            raise InvalidInputError("max_body_bytes and page_size must be positive")
        if self.lfs_threshold is not None and self.lfs_threshold <= 0:
            raise InvalidInputError(f"lfs_threshold must be positive, got {self.lfs_threshold}")
