"""Policy settings as pydantic models: what a preset file or a user hands us, validated.

One model per policy family, discriminated by ``name``: :class:`WindowConfig` (streaming,
truncate), :class:`AMConfig` (am-halve, the default) and the scored-eviction baselines
(:class:`H2OConfig`, :class:`SnapKVConfig`, :class:`KVzipConfig`), which share :class:`SpanConfig`.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from ..compaction.plan import QUERY_CAP

HeadBudgets = Literal["auto", "uniform", "profile", "global", "profile+global"]


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
    query_buffer_dtype: Literal["model", "bfloat16"] = Field(
        default="model",
        description="what the query buffer stores its queries in: the model's dtype, or bf16 (half the memory of "
        "an fp32 model's buffer; fits and scores still compute in fp32)",
    )
    query_tokens: int = Field(
        default=2048,
        ge=16,
        description="repeat-prefill: the most tokens of the span repeated, in evenly spread pieces (repeating half of "
        "a 2k context raised KL 15x at ratio 0.5: the rest gets no queries)",
    )
    query_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="products of the repeat-prefill / self-study pass; auto = bf16 for an fp32 model on CUDA or a CPU "
        "with AMX / AVX512-BF16 (0.75x the time, same KL and recall in bench quality)",
    )
    query_cap: int = Field(default=QUERY_CAP, ge=1, description="reference queries per KV head for scoring keys")
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
        """Keyword arguments of the method (compaction/methods.make_method) this config runs."""
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
    """H2O (compaction/baselines/scored.py): heavy hitters by attention accumulated over the context's own
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
    """SnapKV (compaction/baselines/scored.py): votes of an observation window of the newest ``query_buffer``
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
    """KVzip-style (compaction/baselines/scored.py): entries scored by their largest attention from a
    repeat-prefill pass, top-k over all heads and layers (global head budgets)."""

    name: Literal["kvzip"] = "kvzip"
    queries: _Queries = "repeat-prefill"
    head_budgets: HeadBudgets = "global"
    offline_head_budgets: HeadBudgets | None = "global"
    head_floor: float = Field(default=0.0, ge=0.0, le=1.0)

    method_name: ClassVar[str] = "kvzip"


PolicyConfig = Annotated[WindowConfig | AMConfig | H2OConfig | SnapKVConfig | KVzipConfig, Field(discriminator="name")]
CONFIG_ADAPTER: TypeAdapter = TypeAdapter(PolicyConfig)
