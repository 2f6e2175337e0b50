"""Policies decide WHEN to compact and WHAT span; compaction methods (compaction/, baselines/) decide HOW.

A policy is asked for a :class:`CompactionPlan` when the next forward would not fit the byte
budget (``plan_for_budget``) or when the user calls ``session.compact(ratio)`` (``plan_for_ratio``).
A plan is a list of :class:`SpanRequest` -- "in layer l, replace slots [start_h, end_h) of each KV
head h by at most target_h entries" -- plus the name of the method that computes the replacement.

Policies are selected by name (``resolve_policy("streaming")``), from a preset file in
``policies/`` (JSON or TOML with a ``policy`` key), or from a config object.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .cache import CompactedCache
from .errors import BudgetError, UnknownPolicyError


@dataclass
class SpanRequest:
    """Compact slots [starts[h], ends[h]) of each KV head h of one layer to at most targets[h] entries."""

    layer: int
    starts: list[int]
    ends: list[int]
    targets: list[int]

    @property
    def span_entries(self) -> int:
        return sum(e - s for s, e in zip(self.starts, self.ends))


@dataclass
class CompactionPlan:
    method: str
    reason: str
    requests: list[SpanRequest] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return all(r.span_entries == 0 for r in self.requests)


class WindowConfig(BaseModel):
    """Attention sinks + a recent window (StreamingLLM); ``sinks=0`` is plain truncation.

    When the budget fills, everything between the sinks and the recent window is dropped so that
    the cache falls back to ``fill_after`` of the tokens the budget holds (minus the incoming
    chunk): compaction happens in batches, not on every token.
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["streaming", "truncate"] = "streaming"
    sinks: int = Field(default=4, ge=0)
    min_recent: int = Field(default=8, ge=1, description="smallest recent window the budget must allow")
    fill_after: float = Field(default=0.75, gt=0.0, le=1.0)


PolicyConfig = WindowConfig  # grows into a discriminated union as policies land


class Policy:
    """Base policy over a :class:`CompactedCache`. Subclasses implement the two planning hooks."""

    config: BaseModel
    method: str

    @property
    def name(self) -> str:
        return self.config.name

    def min_tokens(self, chunk: int) -> int:
        """Fewest tokens per head the budget must hold to ingest chunks of ``chunk`` tokens."""
        raise NotImplementedError

    def plan_for_budget(self, cache: CompactedCache, incoming: int) -> CompactionPlan:
        raise NotImplementedError

    def plan_for_ratio(self, cache: CompactedCache, ratio: float) -> CompactionPlan:
        raise NotImplementedError


def _sink_count(layer, sinks: int) -> int:
    """Slots at the start of every head that hold the first ``sinks`` tokens of the session."""
    if sinks == 0 or layer.max_length == 0:
        return 0
    head_tok = layer.tok[:, : min(sinks, layer.max_length)]
    valid = layer.valid_mask()[:, : head_tok.shape[1]]
    per_head = ((head_tok < sinks) & valid).sum(dim=1)
    return int(per_head.min().item())


class WindowPolicy(Policy):
    """Keep the sinks and the most recent tokens; drop the middle (method ``window``)."""

    method = "window"

    def __init__(self, config: WindowConfig | None = None):
        self.config = config or WindowConfig()
        if self.config.name == "truncate" and self.config.sinks:
            self.config = self.config.model_copy(update={"sinks": 0})

    def min_tokens(self, chunk: int) -> int:
        return int((self.config.sinks + self.config.min_recent + chunk) / self.config.fill_after) + 1

    def _plan(self, cache: CompactedCache, keep_recent: int, reason: str) -> CompactionPlan:
        plan = CompactionPlan(method=self.method, reason=reason)
        for idx, layer in enumerate(cache.layers):
            sinks = _sink_count(layer, self.config.sinks)
            starts, ends = [], []
            for length in layer.lengths:
                end = max(sinks, length - keep_recent)
                starts.append(min(sinks, end))
                ends.append(end)
            plan.requests.append(SpanRequest(idx, starts, ends, [0] * layer.num_heads))
        return plan

    def plan_for_budget(self, cache: CompactedCache, incoming: int) -> CompactionPlan:
        target = int(self.config.fill_after * cache.max_tokens()) - incoming
        keep_recent = target - self.config.sinks
        if keep_recent < self.config.min_recent:
            raise BudgetError(
                f"the budget holds {cache.max_tokens()} tokens; policy {self.name!r} cannot make room for "
                f"{incoming} new tokens with {self.config.sinks} sinks and a {self.config.min_recent}-token window"
            )
        return self._plan(cache, keep_recent, "budget")

    def plan_for_ratio(self, cache: CompactedCache, ratio: float) -> CompactionPlan:
        longest = max(layer.max_length for layer in cache.layers)
        keep_recent = max(0, int(round(ratio * longest)) - self.config.sinks)
        return self._plan(cache, keep_recent, "manual")


_REGISTRY: dict[str, type[Policy]] = {"streaming": WindowPolicy, "truncate": WindowPolicy}
_CONFIGS: dict[str, type[BaseModel]] = {"streaming": WindowConfig, "truncate": WindowConfig}


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def policy_from_config(config: BaseModel | dict) -> Policy:
    if isinstance(config, dict):
        name = config.get("name")
        if name not in _CONFIGS:
            raise UnknownPolicyError(f"unknown policy {name!r}; known policies: {', '.join(available_policies())}")
        try:
            config = _CONFIGS[name].model_validate(config)
        except ValidationError as exc:
            raise UnknownPolicyError(f"invalid settings for policy {name!r}: {exc}") from exc
    name = getattr(config, "name", None)
    if name not in _REGISTRY:
        raise UnknownPolicyError(f"unknown policy {name!r}; known policies: {', '.join(available_policies())}")
    return _REGISTRY[name](config)


def resolve_policy(policy: str | Path | BaseModel | dict | Policy | None) -> Policy:
    """A policy from a name, a preset file (JSON/TOML), a config object or dict, or a Policy instance."""
    if policy is None:
        policy = "streaming"
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (BaseModel, dict)):
        return policy_from_config(policy)
    text = str(policy)
    if text in _REGISTRY:
        return policy_from_config({"name": text})
    path = Path(text)
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
        f"unknown policy {text!r}; known policies: {', '.join(available_policies())} (or a .json/.toml preset)"
    )
