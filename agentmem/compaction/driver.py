"""Apply a :class:`~agentmem.policy.CompactionPlan` to a cache, atomically."""

from __future__ import annotations

import time

from ..cache import CompactedCache
from ..errors import CompactionError
from ..events import CompactionEvent
from ..policy import CompactionPlan
from .base import Method, Replacement


def execute_plan(cache: CompactedCache, plan: CompactionPlan, method: Method, policy: str) -> CompactionEvent:
    """Compute every layer's replacement first, then write them all.

    If the method fails (or returns a block that is too long or not finite) on any layer, nothing
    has been written and :class:`CompactionError` is raised: the cache is exactly as it was.
    """
    t0 = time.perf_counter()
    before = (cache.physical_tokens, cache.kv_bytes, cache.payload_bytes)
    staged: list[tuple[int, list[Replacement]]] = []
    for request in plan.requests:
        if request.span_entries == 0:
            continue
        try:
            spans = method.compact(cache, request)
        except CompactionError:
            raise
        except Exception as exc:  # a numerical or shape failure inside the method
            raise CompactionError(f"{method.name} failed on layer {request.layer}: {exc}") from exc
        for h, (_, _, block) in enumerate(spans):
            if block is not None and len(block) > request.targets[h]:
                raise CompactionError(
                    f"{method.name} returned {len(block)} entries for layer {request.layer} head {h}, "
                    f"target {request.targets[h]}"
                )
        staged.append((request.layer, spans))
    cache.validate_spans(staged)
    for layer_idx, spans in staged:
        if (
            cache.layers[layer_idx].even
            and all(b is None for _, _, b in spans)
            and len({(s, e) for s, e, _ in spans}) == 1
        ):
            cache.evict_all_heads(layer_idx, spans[0][0], spans[0][1])
        else:
            cache.replace_spans(layer_idx, spans)
    return CompactionEvent(
        reason=plan.reason,
        policy=policy,
        method=method.name,
        logical_tokens=cache.logical_length,
        tokens_before=before[0],
        tokens_after=cache.physical_tokens,
        kv_bytes_before=before[1],
        kv_bytes_after=cache.kv_bytes,
        payload_bytes_before=before[2],
        payload_bytes_after=cache.payload_bytes,
        seconds=time.perf_counter() - t0,
    )
