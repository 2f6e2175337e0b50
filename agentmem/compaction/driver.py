"""Apply a :class:`~agentmem.compaction.plan.CompactionPlan` to a cache, atomically."""

from __future__ import annotations

import statistics
import time

from ..errors import CompactionError
from ..events import CompactionEvent
from ..kv.cache import CompactedCache
from .plan import CompactionPlan, CompactionReport, Method, Replacement
from .queries import QuerySet


def execute_plan(
    cache: CompactedCache, plan: CompactionPlan, method: Method, policy: str, queries: QuerySet | None = None
) -> CompactionEvent:
    """Compute every layer's replacement first, then write them all.

    If the method fails (or returns a block that is too long or not finite) on any layer, nothing
    has been written and :class:`CompactionError` is raised: the cache is exactly as it was.
    """
    t0 = time.perf_counter()
    before = (cache.physical_tokens, cache.kv_bytes, cache.payload_bytes)
    report = CompactionReport()
    requests = [r for r in plan.requests if r.span_entries != r.target_entries]
    try:
        results = method.compact_all(cache, requests, queries, report)
    except CompactionError:
        raise
    except Exception as exc:  # a numerical or shape failure inside the method
        layers = ", ".join(str(r.layer) for r in requests)
        raise CompactionError(f"{method.name} failed on layers {layers}: {exc}") from exc
    staged: list[tuple[int, list[list[Replacement]]]] = []
    for request, per_head in zip(requests, results):
        for h, (spans, wanted) in enumerate(zip(per_head, request.heads)):
            for (_, _, block), (_, _, target) in zip(spans, wanted):
                if block is not None and len(block) > target:
                    raise CompactionError(
                        f"{method.name} returned {len(block)} entries for layer {request.layer} head {h}, "
                        f"target {target}"
                    )
        staged.append((request.layer, per_head))
    t_write = time.perf_counter()
    # the replacements are held beside the cache until they are written
    staged_bytes = sum(b.nbytes for _, per_head in staged for spans in per_head for *_, b in spans if b is not None)
    report.held(report.work_bytes + staged_bytes)
    cache.validate_spans(staged)
    for layer_idx, per_head in staged:
        single = [spans[0] if len(spans) == 1 else None for spans in per_head]
        if (
            cache.layers[layer_idx].even
            and all(s is not None and s[2] is None for s in single)
            and len({(s[0], s[1]) for s in single}) == 1
        ):
            cache.evict_all_heads(layer_idx, single[0][0], single[0][1])
        else:
            cache.replace_spans(layer_idx, per_head)
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
        phases={**report.phases, "write": time.perf_counter() - t_write},
        work_bytes=report.work_bytes,
        span_tokens=sum(r.span_entries for r in requests) / max(1, sum(len(r.heads) for r in plan.requests)),
        queries=queries.source if queries is not None else None,
        fit_output_error=statistics.fmean(report.output_errors) if report.output_errors else None,
        fit_mass_error=statistics.fmean(report.mass_errors) if report.mass_errors else None,
        notes=report.notes,
    )
