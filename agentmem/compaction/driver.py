"""Apply a :class:`~agentmem.compaction.plan.CompactionPlan` to a cache, atomically."""

from __future__ import annotations

import statistics
import time

from ..errors import CompactionError
from ..events import CompactionEvent
from ..kv.cache import CompactedCache
from .plan import CompactionPlan, CompactionReport, Method, Replacement, SpanRequest
from .queries import QuerySet


def execute_plan(
    cache: CompactedCache,
    plan: CompactionPlan,
    method: Method,
    policy: str,
    queries: QuerySet | None = None,
    work_limit: int | None = None,
) -> CompactionEvent:
    """Compute the layers' replacements first, then write them.

    If the method fails (or returns a block that is too long or not finite) on any layer, nothing
    has been written and :class:`CompactionError` is raised: the cache is exactly as it was.

    ``work_limit`` bounds what the method and the replacements waiting to be written hold at once:
    the layers go in groups whose replacements take at most half of it, each group written (inside
    a cache transaction, so a failure still leaves nothing) before the next is computed; the method
    sizes its batches to what a group's replacements leave (at least an eighth of the limit).
    """
    t0 = time.perf_counter()
    before = (cache.physical_tokens, cache.kv_bytes, cache.payload_bytes)
    requests = [r for r in plan.requests if r.span_entries != r.target_entries]
    groups = _layer_groups(cache, requests, work_limit)
    report = CompactionReport()
    t_write = 0.0
    if len(groups) > 1:
        cache.begin()  # a later group's failure takes back the earlier groups' writes
    try:
        for i, group in enumerate(groups):
            staged_bytes = sum(_replacement_bytes(cache, r) for r in group)
            later = sum(r.held_bytes for g in groups[i + 1 :] for r in g)  # rankings waiting for their group
            if work_limit is not None:
                report.work_limit = max(work_limit // 8, work_limit - staged_bytes - later)
            held, report.work_bytes = report.work_bytes, 0
            staged = _compute(cache, group, method, queries, report)
            t1 = time.perf_counter()
            # the group's replacements wait beside the cache until written
            report.work_bytes = max(held, report.work_bytes + staged_bytes + later)
            _write(cache, staged)
            for r in group:  # its rankings are spent
                r.scores.clear()
                r.ranked.clear()
            t_write += time.perf_counter() - t1
    except BaseException:
        if len(groups) > 1:
            cache.abort()
        raise
    if len(groups) > 1:
        cache.commit()
        report.notes.append(f"written in {len(groups)} layer groups to stay within max_work_mb")
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
        phases={**report.phases, "write": t_write},
        work_bytes=report.work_bytes,
        span_tokens=sum(r.span_entries for r in requests) / max(1, sum(len(r.heads) for r in plan.requests)),
        queries=queries.source if queries is not None else None,
        fit_output_error=statistics.fmean(report.output_errors) if report.output_errors else None,
        fit_mass_error=statistics.fmean(report.mass_errors) if report.mass_errors else None,
        notes=report.notes,
    )


def _replacement_bytes(cache: CompactedCache, request: SpanRequest) -> int:
    """What a request's replacement blocks take until written (their target entries, as stored)."""
    return request.target_entries * cache.layers[request.layer].head_slot_bytes()


def _layer_groups(cache: CompactedCache, requests: list[SpanRequest], work_limit: int | None) -> list[list]:
    """Consecutive requests whose replacements take at most half of ``work_limit`` (one at least)."""
    if work_limit is None:
        return [requests] if requests else []
    groups: list[list[SpanRequest]] = []
    held = 0
    for request in requests:
        size = _replacement_bytes(cache, request)
        if not groups or held + size > work_limit // 2:
            groups.append([])
            held = 0
        groups[-1].append(request)
        held += size
    return groups


def _compute(
    cache: CompactedCache, requests: list[SpanRequest], method: Method, queries: QuerySet | None, report
) -> list[tuple[int, list[list[Replacement]]]]:
    """The method's replacements of ``requests``, checked against their targets; nothing written."""
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
    return staged


def _write(cache: CompactedCache, staged: list[tuple[int, list[list[Replacement]]]]) -> None:
    """Validate every layer's replacements, then write them."""
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
