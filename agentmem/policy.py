"""Policies decide WHEN to compact and WHAT span; methods (compaction/, baselines/) decide HOW.

A policy is asked for a :class:`~agentmem.compaction.base.CompactionPlan` when the next forward
would not fit the byte budget (``plan_for_budget``) or when the user calls
``session.compact(ratio)`` (``plan_for_ratio``). It protects attention sinks, pinned token ranges
(e.g. a system prompt) and, online, a recent window; everything else is compactable.

Policies are selected by name (``resolve_policy("am-halve")``), from a preset file (JSON or TOML,
settings at the top level or under a ``policy`` key), or from a config object.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .budgets import HeadBudgets, HeadProfile, policies_dir, resolve_budgets, retarget
from .cache import CompactedCache
from .compaction.base import CompactionPlan, Method, SpanRequest, split_target
from .errors import BudgetError, UnknownPolicyError
from .layer_store import CacheLayer
from .methods import make_method
from .models import ModelSpec

TokenRange = tuple[int, int]
_MIN_RECENT = 8
_ONLINE_MAX_KEEP = 0.75


class WindowConfig(BaseModel):
    """Attention sinks + a recent window (StreamingLLM); ``truncate`` is the same without sinks.

    When the budget fills, everything between the sinks and the recent window is dropped so that
    the cache falls back to ``fill_after`` of the tokens the budget holds (minus the incoming
    chunk): compaction happens in batches, not on every token.
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["streaming", "truncate"] = "streaming"
    sinks: int = Field(default=4, ge=0)
    min_recent: int = Field(default=8, ge=1, description="smallest recent window the budget must allow")
    fill_after: float = Field(default=0.75, gt=0.0, le=1.0)


_Queries = Literal["recent", "context", "repeat-prefill", "self-study"]


class SpanConfig(BaseModel):
    """Settings shared by the policies that replace spans using reference queries: Attention
    Matching and the scored-eviction baselines (H2O, SnapKV, KVzip). When the budget fills, every
    compactable span (between the protected sinks / pinned ranges and the exact recent window)
    shrinks to ``ratio`` of its physical size; ``session.compact(ratio)`` shrinks everything else.
    """

    model_config = ConfigDict(extra="forbid")

    sinks: int = Field(default=4, ge=0)
    recent: int = Field(
        default=64, ge=0, description="exact recent window (tokens), never compacted online; at most 1/4 of the budget"
    )
    recent_share: float = Field(
        default=0.25, gt=0.0, le=0.75, description="the recent window takes at most this share of the budget"
    )
    ratio: float = Field(default=0.5, gt=0.0, lt=1.0)
    queries: _Queries = Field(default="recent", description="reference queries for online (budget) compaction")
    offline_queries: _Queries = Field(
        default="repeat-prefill", description="reference queries for session.compact(ratio)"
    )
    query_buffer: int = Field(default=128, ge=1, description="tokens kept by the recent/context query buffer")
    query_cap: int = Field(default=8192, ge=1, description="reference queries per KV head for scoring keys")
    head_budgets: HeadBudgets = Field(
        default="uniform",
        description="how an online (budget) compaction shares entries between KV heads: uniform (measured best "
        "online, docs/benchmarks/online_budgets.md), profile (the model's calibrated shares), auto (profile when "
        "one is shipped for the model, else uniform), global (per context, top-k over all heads) or profile+global",
    )
    offline_head_budgets: HeadBudgets | None = Field(
        default="global",
        description="head budgets for session.compact(ratio), where repeat-prefill queries make the per-context "
        "global allocation possible (docs/benchmarks/quality_budgets.md); None = head_budgets",
    )
    profile: str | None = Field(default=None, description="a head profile file (default: the shipped one)")
    head_floor: float = Field(
        default=0.1, ge=0.0, le=1.0, description="non-uniform budgets keep at least this x the uniform target per head"
    )
    tool_ratio: float = Field(
        default=0.25, gt=0.0, le=1.0, description="session.tool_result: keep this fraction of a tool output's tokens"
    )

    method_name: ClassVar[str]

    def method_settings(self) -> dict:
        """Keyword arguments of the method (methods.make_method) this config runs."""
        return {"query_cap": self.query_cap}


class AMConfig(SpanConfig):
    """Attention Matching, halving (the default policy, ``am-halve``). Re-compacting an already
    compacted span includes its beta."""

    name: Literal["am-halve"] = "am-halve"
    query_buffer: int = Field(
        default=256,
        ge=1,
        description="recent queries kept for online fits: 256 fit reasoning traces with 0.56x the KL of 128 "
        "(docs/benchmarks/reasoning.md), same KL on long text",
    )
    on_policy_groups: int = Field(
        default=1, ge=1, description="offline: recompute the queries this many times, layer group by group (1 = off)"
    )
    fit_query_cap: int = Field(
        default=512, ge=1, description="per chunk, the queries attending to it most that fit its beta and values"
    )
    selection: Literal["highest", "highest-max", "highest-mean", "omp"] = Field(
        default="highest", description="key selection: highest attention (RMS / max / mean over queries) or OMP"
    )
    omp_step: int = Field(default=8, ge=1, description="keys added per refit in OMP (1 = plain OMP)")
    chunk: int = Field(default=512, ge=8, description="long spans are compacted in independent chunks of this size")
    ridge: float = Field(default=1.0, ge=0.0, description="value fit regularisation toward copied values")
    beta_ridge: float = Field(default=1e-2, ge=0.0, description="beta fit regularisation toward one common weight")
    beta_iters: int = Field(default=5, ge=0, description="projected-gradient steps of the beta fit")
    fit_beta: bool = Field(default=True, description="False: beta = 0 (ablation)")
    fit_values: bool = Field(default=True, description="False: copied values (ablation)")
    span_selection: bool = Field(default=True, description="rank keys over a whole span, not chunk by chunk")
    selection_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="float32", description="products used to rank keys; auto = bf16 on CUDA (the fits are always fp32)"
    )

    method_name: ClassVar[str] = "am"

    def method_settings(self) -> dict:
        names = ("selection", "omp_step", "chunk", "query_cap", "fit_query_cap", "ridge", "beta_ridge", "beta_iters")
        names += ("fit_beta", "fit_values", "span_selection", "selection_dtype")
        return {n: getattr(self, n) for n in names}


class H2OConfig(SpanConfig):
    """H2O (baselines/scored.py): heavy hitters by attention accumulated over the context's own
    queries (a uniform reservoir of them, causally masked) + the most recent entries."""

    name: Literal["h2o"] = "h2o"
    queries: _Queries = "context"
    offline_queries: _Queries = "context"
    query_buffer: int = 512
    offline_head_budgets: HeadBudgets | None = "uniform"
    recent_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="share of a span's target kept as its newest entries"
    )

    method_name: ClassVar[str] = "h2o"

    def method_settings(self) -> dict:
        return {"query_cap": self.query_cap, "recent_share": self.recent_share}


class SnapKVConfig(SpanConfig):
    """SnapKV (baselines/scored.py): votes of an observation window of the newest ``query_buffer``
    queries, max-pooled over neighbouring entries; the window itself is kept."""

    name: Literal["snapkv"] = "snapkv"
    queries: _Queries = "recent"
    offline_queries: _Queries = "recent"
    query_buffer: int = Field(default=32, ge=1, description="the observation window (tokens)")
    offline_head_budgets: HeadBudgets | None = "uniform"
    pool: int = Field(default=7, ge=1, description="max-pooling kernel over neighbouring entries (odd)")

    method_name: ClassVar[str] = "snapkv"

    def method_settings(self) -> dict:
        return {"query_cap": self.query_cap, "pool": self.pool, "window": self.query_buffer}


class KVzipConfig(SpanConfig):
    """KVzip-style (baselines/scored.py): entries scored by their largest attention from a
    repeat-prefill pass, top-k over all heads and layers (global head budgets)."""

    name: Literal["kvzip"] = "kvzip"
    queries: _Queries = "repeat-prefill"
    head_budgets: HeadBudgets = "global"
    offline_head_budgets: HeadBudgets | None = "global"
    head_floor: float = Field(default=0.0, ge=0.0, le=1.0)

    method_name: ClassVar[str] = "kvzip"


PolicyConfig = Annotated[WindowConfig | AMConfig | H2OConfig | SnapKVConfig | KVzipConfig, Field(discriminator="name")]
_CONFIG_ADAPTER: TypeAdapter = TypeAdapter(PolicyConfig)


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

    @property
    def name(self) -> str:
        return self.config.name

    def attach(self, spec: ModelSpec) -> None:
        """Bind to the session's model (e.g. to find its head profile). Called by the engine."""

    def sinks(self) -> int:
        return getattr(self.config, "sinks", 0)

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


_POLICIES: dict[str, type[Policy]] = {
    "streaming": WindowPolicy,
    "truncate": WindowPolicy,
    "am-halve": SpanPolicy,
    "h2o": SpanPolicy,
    "snapkv": SpanPolicy,
    "kvzip": SpanPolicy,
}


DEFAULT_POLICY = "am-halve"


def preset_dir() -> Path:
    """The policy presets shipped with agentmem (``policies/`` of the package data or source tree)."""
    return policies_dir()


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def policy_from_config(config: BaseModel | dict) -> Policy:
    if isinstance(config, dict):
        name = config.get("name")
        if name not in _POLICIES:
            raise UnknownPolicyError(f"unknown policy {name!r}; known policies: {', '.join(available_policies())}")
        try:
            config = _CONFIG_ADAPTER.validate_python(config)
        except ValidationError as exc:
            raise UnknownPolicyError(f"invalid settings for policy {name!r}: {exc}") from exc
    name = getattr(config, "name", None)
    if name not in _POLICIES:
        raise UnknownPolicyError(f"unknown policy {name!r}; known policies: {', '.join(available_policies())}")
    return _POLICIES[name](config)


def resolve_policy(policy: str | Path | BaseModel | dict | Policy | None) -> Policy:
    """A policy from a name, a preset file (JSON/TOML), a config object or dict, or a Policy instance."""
    if policy is None:
        policy = DEFAULT_POLICY
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (BaseModel, dict)):
        return policy_from_config(policy)
    text = str(policy)
    if text in _POLICIES:
        return policy_from_config({"name": text})
    path = Path(text)
    if not path.suffix and (preset_dir() / f"{text}.toml").is_file():  # a preset shipped with agentmem
        path = preset_dir() / f"{text}.toml"
    if path.suffix in (".json", ".toml"):
        if not path.is_file():
            raise UnknownPolicyError(f"policy preset {text!r} does not exist")
        raw = path.read_text()
        try:
            data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UnknownPolicyError(f"policy preset {text!r} is not valid {path.suffix[1:].upper()}: {exc}") from exc
        return policy_from_config(data.get("policy", data))
    raise UnknownPolicyError(
        f"unknown policy {text!r}; known policies: {', '.join(available_policies())}; presets: "
        f"{', '.join(available_presets())} (or a .json/.toml file)"
    )
