"""H2O: heavy hitters by accumulated attention, plus the most recent entries."""

from __future__ import annotations

from dataclasses import dataclass

from ...kv.cache import CompactedCache
from ..plan import QUERY_CAP, CompactionReport, LayerByLayer, Replacement, SpanRequest
from ..queries import QuerySet
from ..scores import entry_scores
from .scored import evict, head_queries


@dataclass
class H2O(LayerByLayer):
    """H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", arXiv 2306.14048). An entry's score is the attention it has accumulated:
    the sum, over the queries the model has computed, of its softmax weight, each query seeing only
    entries at positions <= its own. Half of a span's target (``recent_share``) goes to its newest
    entries, the rest to the highest scores.

    Queries: (H_q, n, d) with positions (n,) from the session's ``context`` buffer, a uniform
    reservoir sample of every query read so far (the paper sums all of them during decoding; a
    uniform sample ranks entries the same in expectation). Batched per span, not token by token.
    """

    name: str = "h2o"
    needs_queries: bool = True
    query_cap: int = QUERY_CAP
    recent_share: float = 0.5

    def compact(
        self, cache: CompactedCache, request: SpanRequest, queries: QuerySet | None, report: CompactionReport
    ) -> list[list[Replacement]]:
        q, q_pos = head_queries(cache, request.layer, queries, self.query_cap)  # (H_kv, n, d), (n,)
        if q_pos is None:
            report.notes.append(f"layer {request.layer}: query positions unknown, H2O scores without causal mask")

        def score(h, q_h, pos):
            return entry_scores(cache, request.layer, h, q_h, reduce="sum", q_pos=pos, report=report)  # (L_h,)

        return evict(cache, request, q, q_pos, score, lambda t, at_end: round(self.recent_share * t))
