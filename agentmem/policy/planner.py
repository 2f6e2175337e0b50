"""Policies decide WHEN to compact and WHAT span; methods (compaction/, baselines/) decide HOW.

A policy is asked for a :class:`~agentmem.compaction.plan.CompactionPlan` when the next forward
would not fit the byte budget (``plan_for_budget``) or when the user calls
``session.compact(ratio)`` (``plan_for_ratio``). It protects attention sinks, pinned token ranges
(e.g. a system prompt) and, online, a recent window; everything else is compactable.

How many entries each (layer, KV head) keeps is decided here and only here: a plan starts with
uniform targets, :meth:`Policy.plan_for_budget` / :meth:`Policy.plan_for_ratio` apply the
profile shares, and :meth:`Policy.allocate` the per-context (global) ones once the engine has
reference queries (head_budgets.py holds the arithmetic).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel

from ..compaction.methods import make_method
from ..compaction.plan import CompactionPlan, CompactionReport, Method, SpanRequest, split_target
from ..compaction.queries import QuerySet
from ..errors import BudgetError
from ..kv.cache import CompactedCache
from ..kv.layer import CacheLayer
from ..spec import ModelSpec
from .config import AMConfig, SpanConfig, WindowConfig
from .head_budgets import apply_global, resolve_budgets, retarget
from .profiles import HeadProfile

TokenRange = tuple[int, int]
DEFAULT_TOOL_RATIO = 0.25  # tool_result's default for policies without a ``tool_ratio`` setting (window policies)
_MIN_RECENT = 8
_ONLINE_MAX_KEEP = 0.75


def compactable_runs(layer: CacheLayer, protected: list[TokenRange], keep_recent: int) -> list[list[TokenRange]]:
    """Per KV head, the maximal runs of slots that are neither protected nor in the recent window."""
    lmax = layer.max_length
    if lmax == 0:
        return [[] for _ in range(layer.num_heads)]
    free = layer.valid_mask() & ~_protected_mask(layer, protected, lmax)
    lengths = torch.tensor(layer.lengths, device=free.device)
    slot = torch.arange(lmax, device=free.device)
    free &= slot[None, :] < (lengths - keep_recent)[:, None]
    runs = []
    for row in free.cpu().tolist():
        spans, start = [], None
        for i, f in enumerate(row + [False]):
            if f and start is None:
                start = i
            elif not f and start is not None:
                spans.append((start, i))
                start = None
        runs.append(spans)
    return runs


def _protected_mask(layer: CacheLayer, protected: list[TokenRange], lmax: int) -> torch.Tensor:
    """(H, lmax) bool: slots whose token lies in a protected range (padding included; mask it)."""
    tok = layer.grid("tok", lmax).to(torch.long)
    hit = torch.zeros_like(tok, dtype=torch.bool)
    for a, b in protected:
        hit |= (tok >= a) & (tok < b)
    return hit


def _protected_count(layer: CacheLayer, protected: list[TokenRange]) -> list[int]:
    lmax = layer.max_length
    if lmax == 0 or not protected:
        return [0] * layer.num_heads
    return (_protected_mask(layer, protected, lmax) & layer.valid_mask()).sum(dim=1).tolist()


class Policy:
    """Base policy: protection rules, plans for the budget and for an explicit ratio."""

    config: BaseModel
    method: Method

    head_budgets = "uniform"  # effective mode after attach(); a one-line description for stats
    budgets_description = "uniform"
    on_policy_groups = 1  # offline: layer groups whose queries are recomputed after the ones below (1 = off)

    @property
    def name(self) -> str:
        return self.config.name

    def attach(self, spec: ModelSpec) -> None:
        """Bind to the session's model (e.g. to find its head profile). Called by the engine."""

    def sinks(self) -> int:
        return self.config.sinks

    @property
    def tool_ratio(self) -> float:
        """Share of a tool output's tokens that ``session.tool_result`` keeps by default."""
        return DEFAULT_TOOL_RATIO

    def allocate(
        self, plan: CompactionPlan, cache: CompactedCache, queries: QuerySet, report: CompactionReport | None = None
    ) -> None:
        """Per-context head budgets for a plan that asks for them (``plan.budgets``), from the
        reference queries the engine gathered for it (scoring within ``report``'s work limit).
        Policies without such budgets do nothing."""

    def protected(self, pinned: list[TokenRange]) -> list[TokenRange]:
        sinks = self.sinks()
        return ([(0, sinks)] if sinks else []) + list(pinned)

    def min_tokens(self, chunk: int) -> int:
        """Fewest tokens per head the budget must hold to read chunks of ``chunk`` tokens."""
        raise NotImplementedError

    def has_room(self, cap: int, pinned: int, chunk: int = 1) -> bool:
        """Whether a budget of ``cap`` tokens per head can keep ``pinned`` tokens exact (besides the
        sinks) and still make room for chunks of ``chunk`` tokens."""
        raise NotImplementedError

    def plan_for_budget(self, cache: CompactedCache, incoming: int, pinned: list[TokenRange]) -> CompactionPlan:
        raise NotImplementedError

    def plan_for_ratio(
        self, cache: CompactedCache, ratio: float, pinned: list[TokenRange], span: TokenRange | None = None
    ) -> CompactionPlan:
        """Every head ends with round(ratio * its length) entries; protected entries are kept exact.

        ``span=(a, b)`` restricts the plan to the entries of tokens a..b-1 (a tool output): each head
        keeps at most round(ratio * (b - a)) of them, so a span already compacted below that while it
        was read is left as it is; everything outside the span is untouched.
        """
        plan = CompactionPlan(reason="manual", queries=self._offline_queries())
        protected = self.protected(pinned)
        if span is not None:
            protected += [(0, span[0]), (span[1], 2**62)]
        for idx, layer in enumerate(cache.layers):
            recent = 0 if span is not None else self._ratio_recent(layer, ratio, protected)
            runs = compactable_runs(layer, protected, recent)
            heads = []
            for h, head_runs in enumerate(runs):
                free = sum(e - s for s, e in head_runs)
                if span is not None:
                    keep = min(free, round(ratio * (span[1] - span[0])))
                else:
                    keep = round(ratio * layer.lengths[h]) - (layer.lengths[h] - free)
                targets = split_target([e - s for s, e in head_runs], keep)
                heads.append([(s, e, t) for (s, e), t in zip(head_runs, targets)])
            plan.requests.append(SpanRequest(idx, heads))
        return plan

    def _ratio_recent(self, layer: CacheLayer, ratio: float, protected: list[TokenRange]) -> int:
        return 0

    def _offline_queries(self) -> str | None:
        return None


class WindowPolicy(Policy):
    """Keep the sinks (and pinned ranges) and the most recent tokens; drop the rest."""

    def __init__(self, config: WindowConfig | None = None):
        self.config = config or WindowConfig()
        if self.config.name == "truncate" and self.config.sinks:
            self.config = self.config.model_copy(update={"sinks": 0})
        self.method = make_method("window")

    def min_tokens(self, chunk: int) -> int:
        return int((self.config.sinks + self.config.min_recent + chunk) / self.config.fill_after) + 1

    def has_room(self, cap: int, pinned: int, chunk: int = 1) -> bool:
        # plan_for_budget keeps fill_after * cap - chunk - protected recent tokens, at least min_recent
        c = self.config
        return c.sinks + pinned + c.min_recent + chunk <= int(c.fill_after * cap)

    def _drop_all_but(self, cache, keep_recent: int, protected: list[TokenRange], reason: str) -> CompactionPlan:
        plan = CompactionPlan(reason=reason)
        for idx, layer in enumerate(cache.layers):
            runs = compactable_runs(layer, protected, keep_recent)
            plan.requests.append(SpanRequest(idx, [[(s, e, 0) for s, e in r] for r in runs]))
        return plan

    def plan_for_budget(self, cache: CompactedCache, incoming: int, pinned: list[TokenRange]) -> CompactionPlan:
        protected = self.protected(pinned)
        n_protected = max(max(_protected_count(layer, protected)) for layer in cache.layers)
        keep_recent = int(self.config.fill_after * cache.max_tokens()) - incoming - n_protected
        if keep_recent < self.config.min_recent:
            raise BudgetError(
                f"the budget holds {cache.max_tokens()} tokens; policy {self.name!r} cannot make room for "
                f"{incoming} new tokens next to {n_protected} protected ones and a {self.config.min_recent}-token "
                "window: raise max_kv_mb or pin less"
            )
        return self._drop_all_but(cache, keep_recent, protected, "budget")

    def _ratio_recent(self, layer: CacheLayer, ratio: float, protected: list[TokenRange]) -> int:
        n_protected = max(_protected_count(layer, protected))
        return max(0, round(ratio * layer.max_length) - n_protected)


class SpanPolicy(Policy):
    """Halving on budget, ``ratio`` on demand, spans replaced by the config's method (AM or a
    scored eviction) with per-head budgets (see :class:`SpanConfig`)."""

    def __init__(self, config: SpanConfig | None = None):
        self.config = config or AMConfig()
        self.method = make_method(self.config.method_name, **self.config.method_settings())

    profile: HeadProfile | None = None
    offline_budgets = "uniform"

    @property
    def tool_ratio(self) -> float:
        return self.config.tool_ratio

    @property
    def on_policy_groups(self) -> int:
        return self.config.on_policy_groups if isinstance(self.config, AMConfig) else 1

    def allocate(
        self, plan: CompactionPlan, cache: CompactedCache, queries: QuerySet, report: CompactionReport | None = None
    ) -> None:
        if plan.budgets:
            profile = self.profile if plan.budgets == "profile+global" else None
            apply_global(plan, cache, queries, self.config.query_cap, self.config.head_floor, profile, report)

    def attach(self, spec: ModelSpec) -> None:
        c = self.config
        self.head_budgets, self.profile, self.budgets_description = resolve_budgets(c.head_budgets, c.profile, spec)
        if c.offline_head_budgets is None or c.offline_head_budgets == c.head_budgets:
            self.offline_budgets = self.head_budgets
        else:
            self.offline_budgets, profile, offline = resolve_budgets(c.offline_head_budgets, c.profile, spec)
            self.profile = self.profile or profile
            self.budgets_description = f"{self.budgets_description}; offline {offline}"

    def _distribute(
        self, plan: CompactionPlan, cache: CompactedCache, mode: str, max_keep: float = 1.0
    ) -> CompactionPlan:
        """Per-head targets: profile shares now; per-context (global) ones once queries exist."""
        plan.query_tokens, plan.query_dtype = self.config.query_tokens, self.config.query_dtype
        if mode == "profile" and self.profile is not None:
            retarget(plan, cache, self.profile.weights(), self.config.head_floor, max_keep)
        elif mode in ("global", "profile+global"):
            plan.budgets = mode
        return plan

    def min_tokens(self, chunk: int) -> int:
        # sinks + recent window + a compacted span that can still shrink + the incoming chunk
        return self.config.sinks + _MIN_RECENT + 16 + chunk + 1

    def has_room(self, cap: int, pinned: int, chunk: int = 1) -> bool:
        return self.config.sinks + pinned + self._recent(cap) + 16 + chunk + 1 <= cap

    def _recent(self, cap: int) -> int:
        """The exact recent window online: at most recent_share of what the budget holds."""
        return max(_MIN_RECENT, min(self.config.recent, int(cap * self.config.recent_share)))

    def plan_for_budget(self, cache: CompactedCache, incoming: int, pinned: list[TokenRange]) -> CompactionPlan:
        plan = CompactionPlan(reason="budget", queries=self.config.queries)
        protected = self.protected(pinned)
        recent = self._recent(cache.max_tokens())
        ratio = self.config.ratio
        for idx, layer in enumerate(cache.layers):
            runs = compactable_runs(layer, protected, recent)
            if layer.sliding_window is not None:
                # a sliding-window layer only ever shows its newest entries: shrink it by dropping
                # the oldest (what would leave the window first) instead of fitting what no query sees
                heads = [[(s, s + int((1 - ratio) * (e - s)), 0) for s, e in r if e - s > 1] for r in runs]
            else:
                heads = [[(s, e, math.ceil(ratio * (e - s))) for s, e in r if e - s > 1] for r in runs]
            plan.requests.append(SpanRequest(idx, heads))
        if all(r.target_entries == r.span_entries for r in plan.requests):
            raise BudgetError(
                f"policy {self.name!r} has nothing left to compact: protected entries and the "
                f"{recent}-token recent window fill the budget; raise max_kv_mb or pin less"
            )
        # online, every head gives back at least a quarter of its span, so every layer has room to grow
        return self._distribute(plan, cache, self.head_budgets, max_keep=_ONLINE_MAX_KEEP)

    def plan_for_ratio(
        self, cache: CompactedCache, ratio: float, pinned: list[TokenRange], span: TokenRange | None = None
    ) -> CompactionPlan:
        plan = super().plan_for_ratio(cache, ratio, pinned, span)
        for request in plan.requests:
            if cache.layers[request.layer].sliding_window is not None:  # drop the oldest, as above
                request.heads = [[(s, s + (e - s - t), 0) for s, e, t in spans if e - s > t] for spans in request.heads]
        return self._distribute(plan, cache, self.offline_budgets)

    def _offline_queries(self) -> str | None:
        return self.config.offline_queries
