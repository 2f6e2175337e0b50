"""SnapKV: an observation window of the newest queries votes for the entries to keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ...kv.cache import CompactedCache
from ..plan import QUERY_CAP, CompactionReport, LayerByLayer, Replacement, SpanRequest
from ..queries import QuerySet
from ..scores import entry_scores
from .scored import evict, head_queries


@dataclass
class SnapKV(LayerByLayer):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
    arXiv 2404.14469). Each entry's score is the attention the observation window -- the newest
    ``window`` queries, all query heads of the GQA group -- gives it (summed), max-pooled over
    ``pool`` neighbouring entries so that kept entries come with their context; the top-scoring
    entries are kept per head. The window's own entries are kept too (offline, where the span
    reaches the newest entry; online they lie in the policy's exact recent window anyway).

    Queries: (H_q, window, d) from the session's ``recent`` buffer, whose size is the window.
    """

    name: str = "snapkv"
    needs_queries: bool = True
    query_cap: int = QUERY_CAP
    window: int = 32
    pool: int = 7

    def compact(
        self, cache: CompactedCache, request: SpanRequest, queries: QuerySet | None, report: CompactionReport
    ) -> list[list[Replacement]]:
        q, q_pos = head_queries(cache, request.layer, queries, self.query_cap)  # (H_kv, rep * window, d)

        def score(h, q_h, pos):
            s = entry_scores(cache, request.layer, h, q_h, reduce="sum", q_pos=pos, report=report)  # (L_h,)
            if self.pool > 1:
                s = F.max_pool1d(s[None, None], self.pool, stride=1, padding=self.pool // 2)[0, 0, : s.numel()]
            return s

        return evict(cache, request, q, q_pos, score, lambda t, at_end: self.window if at_end else 0)
