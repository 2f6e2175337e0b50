"""Scored eviction: each KV head keeps the entries its score ranks highest, copied as they are.

The body shared by H2O, SnapKV and KVzip (one dataclass each, which only say how entries are
scored). Per requested span (start, end, target) of head h: the newest
``keep_last(target, span reaches the head's newest entry)`` entries of the span are kept, the
rest of the target goes to the highest-scoring entries of the span; everything else is dropped.
Kept entries keep their beta (a span AM compacted earlier can be evicted from like any other).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import CompactionError
from ...kv.cache import CompactedCache
from ...kv.layer import FIELDS, Block
from ..plan import Replacement, SpanRequest
from ..queries import QuerySet

Scorer = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (h, q (n, d), q_pos) -> (L_h,)


def head_queries(
    cache: CompactedCache, layer_idx: int, queries: QuerySet | None, cap: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H_kv, n, d) reference queries of the layer's KV heads and their positions (n,) or None."""
    if queries is None or layer_idx not in queries.per_layer:
        raise CompactionError(f"scored eviction needs reference queries for layer {layer_idx}")
    layer = cache.layers[layer_idx]
    q = queries.for_kv_heads(layer_idx, layer.num_heads, cap).to(layer.device)
    pos = queries.positions_for_kv_heads(layer_idx, layer.num_heads, cap)
    return q, None if pos is None else pos.to(layer.device)


def evict(
    cache: CompactedCache,
    request: SpanRequest,
    q: torch.Tensor,
    q_pos: torch.Tensor | None,
    score: Scorer,
    keep_last: Callable[[int, bool], int],
) -> list[list[Replacement]]:
    """Per head of ``request``, one (start, end, kept entries or None) per span."""
    layer = cache.layers[request.layer]
    out: list[list[Replacement]] = []
    for h, spans in enumerate(request.heads):
        scores = score(h, q[h], q_pos) if any(0 < t < e - s for s, e, t in spans) else None
        head_out: list[Replacement] = []
        for start, end, target in spans:
            if target <= 0:
                head_out.append((start, end, None))
                continue
            if target >= end - start:
                head_out.append((start, end, layer.read_span(h, start, end)))
                continue
            last = min(target, max(0, keep_last(target, end == layer.lengths[h])))
            top = target - last
            split = end - last
            ranked = scores[start:split]
            chosen = torch.topk(ranked, top).indices + start if top else ranked.new_zeros(0, dtype=torch.long)
            slots = torch.cat([chosen.sort().values, torch.arange(split, end, device=chosen.device)])
            block = Block(*(layer.head(f, h)[slots] for f in FIELDS))
            head_out.append((start, end, block))
        out.append(head_out)
    return out
