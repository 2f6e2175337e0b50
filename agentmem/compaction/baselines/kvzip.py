"""KVzip-style eviction: entries scored by their attention from a repeat-prefill pass."""

from __future__ import annotations

from dataclasses import dataclass

from ...kv.cache import CompactedCache
from ..plan import QUERY_CAP, CompactionReport, LayerByLayer, Replacement, SpanRequest
from ..queries import QuerySet
from ..scores import entry_scores
from .scored import evict, head_queries


@dataclass
class KVzip(LayerByLayer):
    """KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context
    Reconstruction", arXiv 2505.23416). The model is asked to repeat the context; each entry's
    score is the largest softmax weight any query of that repetition gives it. Entries are kept
    by score; which heads keep how many is decided globally over all heads and layers (the
    policy's ``global`` head budgets, policy/head_budgets.py, with the same score).

    Queries: (H_q, n, d) from a repeat-prefill pass (compaction/queries.py).
    """

    name: str = "kvzip"
    needs_queries: bool = True
    query_cap: int = QUERY_CAP

    def compact(
        self, cache: CompactedCache, request: SpanRequest, queries: QuerySet | None, report: CompactionReport
    ) -> list[list[Replacement]]:
        q, _ = head_queries(cache, request.layer, queries, self.query_cap)  # (H_kv, n, d)

        def score(h, q_h, pos):  # (L_h,); the global allocation already scored them with the same queries
            cached = request.scores.get(h)
            return cached if cached is not None else entry_scores(cache, request.layer, h, q_h, report=report)

        return evict(cache, request, q, None, score, lambda t, at_end: 0)
