"""Non-uniform per-head budgets: how many entries each (layer, KV head) keeps in a compaction.

A policy first plans every compactable span with a uniform target (each head keeps ``ratio`` of
its span). This module re-distributes the plan's *total* target across heads, never past what a
head holds:

* ``profile``: shares calibrated offline from per-head sensitivity curves (``agentmem calibrate``,
  :class:`HeadProfile`); no queries needed, so it also serves online compaction.
* ``global``: per context, KVzip-style: every compactable entry is scored by its largest softmax
  weight over the reference queries (under the head's full softmax, so scores of different heads
  are comparable) and the plan's total is a global top-k over all heads and layers.
* ``profile+global``: the mean of the two allocations.

Sliding-window layers are left alone (they drop their oldest entries; see planner.py). Every mode
keeps at least ``floor`` x the uniform target in each head, so no head is emptied by one context.

Water-filling: head i gets ``min(n_i, max(floor_i, lam * w_i))`` entries with ``lam`` chosen so that
the total is met, rounded by largest remainder.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..compaction.plan import CompactionPlan, CompactionReport, SpanRequest, split_target
from ..compaction.scores import entry_scores
from ..errors import ProfileError
from .config import HeadBudgets
from .profiles import HeadProfile, check_profile, find_profile, load_profile

if TYPE_CHECKING:
    from ..compaction.queries import QuerySet
    from ..kv.cache import CompactedCache
    from ..spec import ModelSpec


def resolve_budgets(
    mode: HeadBudgets, profile_path: str | None, spec: ModelSpec
) -> tuple[str, HeadProfile | None, str]:
    """The effective mode, the profile it uses and a one-line description for stats.

    ``auto``: the shipped (or given) profile matching the model, else uniform. A profile that is
    missing, corrupt or for another model falls back to uniform budgets with a warning (the session
    keeps working); global mode needs no profile.
    """
    if mode in ("uniform", "global"):
        return mode, None, mode
    path = Path(profile_path) if profile_path else find_profile(spec)
    if path is None:
        if mode != "auto":
            warnings.warn(
                f"head_budgets={mode!r}: no head profile for {spec.name!r} (config {spec.config_hash}); "
                "using uniform budgets. Create one with `agentmem calibrate`.",
                stacklevel=3,
            )
        return "uniform", None, f"uniform (no head profile for {spec.name})"
    try:
        profile = load_profile(path)
        check_profile(profile, spec, path)
    except ProfileError as exc:
        warnings.warn(f"{exc}; using uniform budgets", stacklevel=3)
        return "uniform", None, f"uniform (rejected profile {path.name})"
    effective = "profile" if mode == "auto" else mode
    return effective, profile, f"{effective} ({path.name})"


# ---------------------------------------------------------------------- allocation math
def water_fill(caps: torch.Tensor, weights: torch.Tensor, total: int, floor: torch.Tensor | None = None) -> list[int]:
    """Integer targets t (N,) with floor <= t <= caps, sum t = min(total, sum caps), t ~ weights.

    caps (N,) int, weights (N,) >= 0, floor (N,) (clipped to caps). fp64, bisection on the level.
    """
    caps = caps.double()
    w = weights.double().clamp_min(0)
    lo_t = torch.zeros_like(caps) if floor is None else torch.minimum(floor.double(), caps)
    total = int(min(total, int(caps.sum().item())))
    if total <= int(math.ceil(lo_t.sum().item())):  # the floors alone exhaust the total: share them
        return split_target([int(x) for x in lo_t.round().long().tolist()], total)
    if total >= int(caps.sum().item()):
        return [int(x) for x in caps.long().tolist()]
    # a zero weight still takes entries once every other head is full
    w = torch.ones_like(caps) if float(w.max()) <= 0 else w.clamp_min(float(w.max()) * 1e-9)

    def filled(lam: float) -> torch.Tensor:
        return torch.minimum(caps, torch.maximum(lo_t, lam * w))

    lo, hi = 0.0, 1.0
    while float(filled(hi).sum()) < total and hi < 1e30:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if float(filled(mid).sum()) < total:
            lo = mid
        else:
            hi = mid
    raw = filled(hi)
    out = raw.floor()
    rest = total - int(out.sum().item())
    if rest > 0:
        room = (out < caps).double()
        order = torch.argsort((raw - out) * room + room, descending=True)
        out[order[:rest]] += 1
    return [int(x) for x in out.long().tolist()]


def _heads(plan: CompactionPlan, cache: CompactedCache) -> list[tuple[SpanRequest, int]]:
    """(request, head) pairs the allocation redistributes: global-attention layers only."""
    return [(r, h) for r in plan.requests if cache.layers[r.layer].sliding_window is None for h in range(len(r.heads))]


def _set_head_targets(request: SpanRequest, h: int, target: int) -> None:
    spans = request.heads[h]
    parts = split_target([e - s for s, e, _ in spans], target)
    request.heads[h] = [(s, e, t) for (s, e, _), t in zip(spans, parts)]


def retarget(
    plan: CompactionPlan,
    cache: CompactedCache,
    weights: dict[tuple[int, int], float],
    floor: float,
    max_keep: float = 1.0,
) -> None:
    """Redistribute the plan's total target over heads in proportion to ``weights[(layer, head)]``;
    no head keeps more than ``max_keep`` of its span (online: every head must make some room)."""
    pairs = _heads(plan, cache)
    if not pairs:
        return
    caps = torch.tensor([int(max_keep * sum(e - s for s, e, _ in r.heads[h])) for r, h in pairs])
    uniform = torch.tensor([sum(t for *_, t in r.heads[h]) for r, h in pairs])
    w = torch.tensor([weights.get((r.layer, h), 0.0) for r, h in pairs])
    targets = water_fill(caps, w, int(uniform.sum()), floor * uniform.double())
    for (r, h), t in zip(pairs, targets):
        _set_head_targets(r, h, t)


def global_targets(
    plan: CompactionPlan,
    cache: CompactedCache,
    queries: QuerySet,
    query_cap: int,
    floor: float,
    report: CompactionReport | None = None,
) -> dict[tuple[int, int], int]:
    """Per (layer, head): how many of its compactable entries are in the global top-k of the plan's
    total target, by :func:`entry_scores`; at least ``floor`` x the head's uniform target. Scoring
    passes (where the method did not score already) are sized to ``report``'s work limit."""
    pairs = [(r, h) for r, h in _heads(plan, cache) if r.layer in queries.per_layer]
    if not pairs:
        return {}
    scores, owner, floors = [], [], []
    total = 0
    stacked: dict[int, torch.Tensor] = {}  # layer -> (H_kv, n, d), built once per layer
    for i, (r, h) in enumerate(pairs):
        s = r.scores.get(h)  # the method's own pass may have scored them (AttentionMatching.prepare)
        if s is None:
            layer = cache.layers[r.layer]
            if r.layer not in stacked:
                stacked[r.layer] = queries.for_kv_heads(r.layer, layer.num_heads, query_cap).to(layer.device)
            s = entry_scores(cache, r.layer, h, stacked[r.layer][h], report=report)
            r.scores[h] = s
        idx = torch.cat([torch.arange(a, b, device=s.device) for a, b, _ in r.heads[h]] or [s.new_zeros(0).long()])
        scores.append(s[idx].cpu())
        owner.append(torch.full((idx.numel(),), i, dtype=torch.long))
        uniform = sum(t for *_, t in r.heads[h])
        floors.append(min(int(idx.numel()), int(math.floor(floor * uniform))))
        total += uniform
    flat, who = torch.cat(scores), torch.cat(owner)
    counts = torch.tensor(floors, dtype=torch.long)
    # each head's floor: its best entries are taken first, the rest of the total goes to the global top-k
    taken = torch.zeros(flat.numel(), dtype=torch.bool)
    offset = 0
    for i, s in enumerate(scores):
        if floors[i]:
            taken[offset + torch.topk(s, floors[i]).indices] = True
        offset += s.numel()
    rest = max(0, min(total, flat.numel()) - int(counts.sum()))
    if rest:
        pick = torch.topk(flat.masked_fill(taken, -1.0), rest).indices
        counts += torch.bincount(who[pick], minlength=len(pairs))
    return {(r.layer, h): int(c) for (r, h), c in zip(pairs, counts.tolist())}


def apply_global(
    plan: CompactionPlan,
    cache: CompactedCache,
    queries: QuerySet,
    query_cap: int,
    floor: float,
    profile: HeadProfile | None = None,
    report: CompactionReport | None = None,
) -> None:
    """Retarget the plan per context (global top-k); with a profile, average the two allocations."""
    counts = global_targets(plan, cache, queries, query_cap, floor, report)
    if not counts:
        return
    if profile is not None:
        shadow = copy.deepcopy(plan)
        retarget(shadow, cache, profile.weights(), floor)
        prof = {(r.layer, h): sum(t for *_, t in r.heads[h]) for r, h in _heads(shadow, cache)}
        pairs = list(counts)
        caps = torch.tensor([sum(e - s for s, e, _ in _request(plan, k[0]).heads[k[1]]) for k in pairs])
        mean = torch.tensor([(counts[k] + prof.get(k, counts[k])) / 2 for k in pairs])
        counts = dict(zip(pairs, water_fill(caps, mean, sum(counts.values()))))
    for (layer_idx, h), t in counts.items():
        _set_head_targets(_request(plan, layer_idx), h, t)


def _request(plan: CompactionPlan, layer_idx: int) -> SpanRequest:
    return next(r for r in plan.requests if r.layer == layer_idx)
