"""How a session's memory budget is shared between the KV cache, the query buffer and compaction work."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BudgetError
from .units import MiB


@dataclass(frozen=True)
class MemoryBudget:
    """``total`` bytes (the session's ``max_kv_mb``; None: unbounded) and what they cover.

    ``covers="kv"``: ``total`` bounds the cache; ``work`` (bytes, None: no bound) bounds one
    compaction's working memory beside it. ``covers="all"``: ``total`` bounds cache + query buffer +
    work together; ``work`` defaults to a third of what the query buffer leaves (half the cache's
    share). The undo state of a running operation (the layers as they were: on a CPU the old buffers,
    on CUDA copies in host memory) is covered by neither.
    """

    total: int | None
    covers: str = "kv"
    work: int | None = None

    def __post_init__(self) -> None:
        if self.covers not in ("kv", "all"):
            raise ValueError(f"budget_covers must be 'kv' or 'all' (got {self.covers!r})")
        if self.covers == "all" and self.total is None:
            raise BudgetError("budget_covers='all' needs a max_kv_mb to cover: give one, or use budget_covers='kv'")
        if self.work is not None and self.work <= 0:
            raise BudgetError(f"max_work_mb must be > 0 (got {self.work / MiB:g}); use None for the default")

    def split(self, buffer_bytes: int) -> tuple[int | None, int | None]:
        """(the cache's byte bound, the work bound) beside a query buffer of ``buffer_bytes``."""
        if self.total is None or self.covers == "kv":
            return self.total, self.work
        rest = self.total - buffer_bytes
        work = self.work if self.work is not None else rest // 3
        if rest - work <= 0:
            raise BudgetError(
                f"max_kv_mb={round(self.total / MiB, 4):g} with budget_covers='all' must cover the query buffer "
                f"({buffer_bytes / MiB:.2f} MiB) and compaction work ({max(work, 0) / MiB:.2f} MiB) besides the "
                "cache: raise max_kv_mb, lower max_work_mb or the policy's query_buffer"
            )
        return rest - work, work

    def total_for(self, cache_bytes: int, buffer_bytes: int) -> int:
        """The smallest ``total`` whose cache share is ``cache_bytes`` (the inverse of :meth:`split`)."""
        if self.covers == "kv":
            return cache_bytes
        work = self.work if self.work is not None else -(-cache_bytes // 2)
        return cache_bytes + buffer_bytes + work
