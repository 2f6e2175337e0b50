"""The narrow interface every compaction method implements (Attention Matching and the baselines)."""

from __future__ import annotations

from typing import Protocol

from ..cache import Block, CompactedCache
from ..policy import SpanRequest

Replacement = tuple[int, int, Block | None]  # (start, end, block) for one KV head; None deletes the span


class Method(Protocol):
    """Computes the replacement of one layer's spans. Must not modify the cache."""

    name: str

    def compact(self, cache: CompactedCache, request: SpanRequest) -> list[Replacement]:
        """One ``(start, end, block)`` per KV head, with ``len(block) <= request.targets[h]``."""
        ...
