"""Window eviction: attention sinks + recent window, the spans in between dropped."""

from __future__ import annotations

from dataclasses import dataclass

from ...kv.cache import CompactedCache
from ..plan import CompactionReport, LayerByLayer, Replacement, SpanRequest
from ..queries import QuerySet


@dataclass
class WindowEviction(LayerByLayer):
    """StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453). The policy chooses the spans (everything between the protected sinks and
    the recent window); this method drops them: for each KV head, slots [start, end) -> nothing.
    """

    name: str = "window"
    needs_queries: bool = False

    def compact(
        self, cache: CompactedCache, request: SpanRequest, queries: QuerySet | None, report: CompactionReport
    ) -> list[list[Replacement]]:
        return [[(start, end, None) for start, end, _ in spans] for spans in request.heads]
