"""The vocabulary between policies (WHAT to compact) and methods (HOW): plans, requests, reports.

A :class:`CompactionPlan` lists :class:`SpanRequest` s -- "in layer l, replace each of these slot
spans of KV head h by at most ``target`` entries" -- and names a method. A :class:`Method`
computes the replacements without touching the cache; the driver validates and applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from ..kv.layer import Block

if TYPE_CHECKING:
    from ..kv.cache import CompactedCache
    from .queries import QuerySet
    from .scores import SpanScores


QUERY_CAP = 8192  # reference queries per KV head a method scores keys with (the default of every method)


def split_target(lengths: list[int], target: int) -> list[int]:
    """Share ``target`` between parts of the given lengths in proportion (largest remainder)."""
    total = sum(lengths)
    if total == 0:
        return [0] * len(lengths)
    target = max(0, min(target, total))
    raw = [target * n / total for n in lengths]
    out = [int(math.floor(x)) for x in raw]
    for i in sorted(range(len(lengths)), key=lambda i: out[i] - raw[i])[: target - sum(out)]:
        out[i] += 1
    return out


Replacement = tuple[int, int, Block | None]  # (start, end, block) of one head; None deletes the span


@dataclass
class SpanRequest:
    """``heads[h]``: KV head h's spans as ascending, non-overlapping (start, end, target) slot ranges."""

    layer: int
    heads: list[list[tuple[int, int, int]]]
    # per KV head, the max softmax weight of each of its entries (compaction/scores.py), kept when
    # the method's or the global allocation's pass computed them, so that nothing computes them twice
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    # per (head, start, end): the span ranking a method computed in the same pass (Attention Matching)
    ranked: dict[tuple[int, int, int], SpanScores] = field(default_factory=dict)

    @property
    def held_bytes(self) -> int:
        """Bytes of the scores and span rankings kept on this request until it is compacted."""
        scores = sum(t.numel() * t.element_size() for t in self.scores.values())
        return scores + sum(sc.nbytes for sc in self.ranked.values())

    @property
    def span_entries(self) -> int:
        return sum(e - s for spans in self.heads for s, e, _ in spans)

    @property
    def target_entries(self) -> int:
        return sum(t for spans in self.heads for _, _, t in spans)


@dataclass
class CompactionPlan:
    reason: str
    requests: list[SpanRequest] = field(default_factory=list)
    queries: str | None = None  # the query source the method needs (None: it needs none)
    budgets: str | None = None  # per-head targets still to be set from the queries ("global", "profile+global")
    query_tokens: int = 2048  # the most tokens of text a repeat-prefill pass repeats for queries
    query_dtype: str = "auto"  # products of a scratch query pass (compaction/reference.py pass_dtype)


@dataclass
class CompactionReport:
    """What a method says about its work: notes (fallbacks), fit errors per fitted block, seconds
    per phase ("scores", "fits", ...) and the largest working set it held (bytes).

    ``work_limit`` (given, bytes; None: the method's own defaults) is the most scratch memory the
    method may hold beside the cache at once: it sizes its blocks of scores and batches of fits
    to it (:meth:`limit`). Results do not depend on it, only speed does.
    """

    notes: list[str] = field(default_factory=list)
    output_errors: list[float] = field(default_factory=list)
    mass_errors: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    work_bytes: int = 0
    work_limit: int | None = None

    def timed(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def held(self, nbytes: int) -> None:
        self.work_bytes = max(self.work_bytes, int(nbytes))

    def limit(self, default: int) -> int:
        """The scratch bytes a step may use: its ``default`` (a speed choice), at most ``work_limit``."""
        return default if self.work_limit is None else max(1, min(default, self.work_limit))


class Method(Protocol):
    """Computes the replacement of a plan's spans. Must not modify the cache."""

    name: str
    needs_queries: bool

    def compact(
        self, cache: CompactedCache, request: SpanRequest, queries: QuerySet | None, report: CompactionReport
    ) -> list[list[Replacement]]:
        """Per KV head, one ``(start, end, block)`` for each requested span, ``len(block) <= target``."""
        ...

    def compact_all(
        self, cache: CompactedCache, requests: list[SpanRequest], queries: QuerySet | None, report: CompactionReport
    ) -> list[list[list[Replacement]]]:
        """:meth:`compact` of every request (a method may batch work across layers)."""
        ...

    def prepare(
        self, cache: CompactedCache, requests: list[SpanRequest], queries: QuerySet, report: CompactionReport
    ) -> None:
        """Before per-context head budgets are set: fill ``request.scores`` (and what else the
        method will rank by) in one pass, so the allocation does not score the entries again."""
        ...


class LayerByLayer:
    """For methods that compact one layer at a time and score nothing in advance."""

    def compact_all(
        self, cache: CompactedCache, requests: list[SpanRequest], queries: QuerySet | None, report: CompactionReport
    ) -> list[list[list[Replacement]]]:
        return [self.compact(cache, r, queries, report) for r in requests]

    def prepare(
        self, cache: CompactedCache, requests: list[SpanRequest], queries: QuerySet, report: CompactionReport
    ) -> None:
        return None
