"""Window eviction: attention sinks + recent window, the span in between dropped."""

from __future__ import annotations

from dataclasses import dataclass

from ..cache import CompactedCache
from ..compaction.base import Replacement
from ..policy import SpanRequest


@dataclass
class WindowEviction:
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453). The policy chooses the span (everything between the sinks and the recent
    window); this method drops it: for each KV head, slots [start, end) -> nothing.
    """

    name: str = "window"

    def compact(self, cache: CompactedCache, request: SpanRequest) -> list[Replacement]:
        return [(start, end, None) for start, end in zip(request.starts, request.ends)]
