"""Engine: the model, the cache and the policy, and the forward passes that keep them in budget.

The engine is what the session drives: it runs token ids through the model in budget-sized
chunks, making room before each (sliding-window trims, position maintenance, compaction by the
policy), gathers the reference queries a compaction method needs (buffered, or by scratch passes
that leave no trace) and applies compaction plans. It knows nothing about text, chat or sampling.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from .budget import MemoryBudget
from .compaction import reference
from .compaction.driver import execute_plan
from .compaction.plan import CompactionPlan, CompactionReport
from .compaction.queries import QueryBuffer, QuerySet
from .errors import BudgetError, CompactionError
from .events import CompactionEvent
from .kv.cache import CompactedCache
from .kv.positions import PositionConfig, effective_max_distance, maintain
from .models import LoadedModel
from .policy.planner import Policy, SpanPolicy
from .units import MiB

_MAX_COMPACTIONS_PER_STEP = 8


class Engine:
    """Owns the cache of one sequence; see the module docstring.

    ``transcript_ids`` holds every token accepted, in order (compaction never touches it): token i
    of the transcript is the entry whose ``tok`` is i. ``pinned`` lists token ranges no policy may
    compact; ``compactions`` every compaction applied to this cache.

    Invariant: the last token accepted is *pending* (``pending``) -- in the transcript, but not yet
    run through the model. The next call runs it first, so there are always logits for what comes
    next without storing any. ``started``: whether anything has been read (raw text gets a BOS
    only at the very start).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        policy: Policy,
        positions: PositionConfig,
        max_kv_bytes: int | None,
        chunk_tokens: int,
        seed: int = 0,
        *,
        max_work_bytes: int | None = None,
        budget_covers: str = "kv",
    ):
        self.budget = MemoryBudget(max_kv_bytes, budget_covers, max_work_bytes)  # validates the settings
        self.loaded = loaded
        self.policy = policy
        self.positions = positions
        self.seed = seed
        query_buffer = self._query_buffer_for(policy)
        cache_bytes, self.work_limit = self.budget.split(_nbytes(query_buffer))
        self.cache = CompactedCache(loaded.spec, loaded.dtype, loaded.device, cache_bytes)
        cap = self.cache.max_tokens()
        self.chunk_tokens = max(1, min(chunk_tokens, cap // 4))
        limit = effective_max_distance(self.cache, positions)
        if positions.mode == "clamp" and limit:  # a chunk must fit well inside the distance limit
            self.chunk_tokens = max(1, min(self.chunk_tokens, limit // 4))
        need = policy.min_tokens(1)
        if cap < need:
            mib = round(max_kv_bytes / MiB, 4)
            share = "" if cache_bytes == max_kv_bytes else f" (budget_covers='all': {cache_bytes / MiB:.2f} MiB of KV)"
            least = self.budget.total_for(self.cache.bytes_for_tokens(need), _nbytes(query_buffer))
            raise BudgetError(
                f"max_kv_mb={mib:g}{share} holds {cap} tokens of {loaded.spec.name} "
                f"({self.cache.bytes_per_token()} bytes each); policy {policy.name!r} needs at least "
                f"{need}: use max_kv_mb >= {math.ceil(least / MiB * 100) / 100:.2f}"
            )
        policy.attach(loaded.spec)
        self.compactions: list[CompactionEvent] = []
        self.pinned: list[tuple[int, int]] = []
        self.transcript_ids = array("i")
        self.pending: list[int] = []
        self.started = False
        self.cache.query_buffer = query_buffer

    # ------------------------------------------------------------------ tokens in, logits out
    def read(self, ids: Sequence[int], record: list[CompactionEvent] | None) -> None:
        """Accept tokens: run what is pending and all but the last; the last becomes pending."""
        if not ids:
            return
        todo = self.take(ids)
        self.pending = todo[-1:]
        if len(todo) > 1:
            self.run(self.cache, todo[:-1], "none", record)

    def take(self, ids: Sequence[int]) -> list[int]:
        """Accept ``ids`` into the transcript and return what must now run through the model: the
        pending token(s), then ``ids`` (nothing stays pending; for a caller that runs them itself)."""
        todo = self.pending + list(ids)
        self.pending, self.started = [], True
        self.transcript_ids.extend(ids)
        return todo

    def predict(self, ids: Sequence[int], record: list[CompactionEvent] | None) -> torch.Tensor:
        """Accept ``ids`` and run them with what is pending; the next-token logits (V,) fp32."""
        return self.run(self.cache, self.take(ids), "last", record)

    def accept(self, token: int) -> None:
        """A sampled token joins the transcript and becomes pending."""
        self.pending = [token]
        self.transcript_ids.append(token)

    def mark(self) -> tuple:
        """What :meth:`restore` puts back (the cache has its own transaction): transcript length,
        pins, ledger length, pending tokens, ``started`` and the policy."""
        return (
            len(self.transcript_ids),
            list(self.pinned),
            len(self.compactions),
            list(self.pending),
            self.started,
            self.policy,
            (self.cache.max_bytes, self.work_limit, self.chunk_tokens),
        )

    def restore(self, mark: tuple) -> None:
        n_ids, pinned, n_events, pending, started, policy, bounds = mark
        del self.transcript_ids[n_ids:]
        self.pinned[:] = pinned
        del self.compactions[n_events:]
        self.pending, self.started, self.policy = pending, started, policy
        self.cache.max_bytes, self.work_limit, self.chunk_tokens = bounds

    def _query_buffer_for(self, policy: Policy) -> QueryBuffer | None:
        """The query buffer a policy's methods read (None for policies that need no queries)."""
        if not isinstance(policy, SpanPolicy):
            return None
        cfg, spec = policy.config, self.loaded.spec
        mode = "context" if "context" in (cfg.queries, cfg.offline_queries) else "recent"
        args = (spec.num_layers, spec.num_q_heads, spec.head_dim, cfg.query_buffer, mode)
        dtype = torch.bfloat16 if cfg.query_buffer_dtype == "bfloat16" else self.loaded.dtype
        return QueryBuffer(*args, self.loaded.device, dtype, seed=self.seed)

    def budget_for(self, cache_bytes: int) -> int:
        """The smallest ``max_kv_mb`` (in bytes) that gives the cache ``cache_bytes`` beside this
        session's query buffer."""
        return self.budget.total_for(cache_bytes, _nbytes(self.cache.query_buffer))

    def set_policy(self, policy: Policy) -> None:
        """Switch policies mid-session. The query buffer becomes the one the new policy reads (keeping
        the rows it can); a buffer that starts empty under a non-empty cache is filled by a scratch pass
        over the newest tokens read, after the old policy has made room for it if it must."""
        policy.attach(self.loaded.spec)
        old, new = self.cache.query_buffer, self._query_buffer_for(policy)
        bounds = self.budget.split(_nbytes(new))  # covering all: a policy's query buffer changes the cache's share
        cap, pinned = self.cache.max_tokens(bounds[0]), sum(b - a for a, b in self.pinned)
        if bounds[0] is not None and not policy.has_room(cap, pinned, 1):
            raise BudgetError(
                f"policy {policy.name!r} cannot work in {cap} tokens next to the {pinned} pinned ones: "
                "raise max_kv_mb or pin less"
            )
        if bounds[0] is not None and self.cache.kv_bytes > bounds[0]:
            self.cache.shrink_to_fit()  # spare capacity first (an abort puts it back)
            if self.cache.kv_bytes > bounds[0]:
                raise BudgetError(
                    f"with policy {policy.name!r} (query buffer {new.nbytes / MiB if new else 0:.2f} MiB) the cache "
                    f"gets {bounds[0] / MiB:.2f} MiB of the budget and holds {self.cache.kv_bytes / MiB:.2f}: compact "
                    "first or raise max_kv_mb"
                )
        # the new share holds from here on: the scratch pass below must fit it (an abort restores the old)
        self.cache.max_bytes, self.work_limit = bounds
        self.chunk_tokens = max(1, min(self.chunk_tokens, cap // 4))
        if new is not None and old is not None and old.layout == new.layout:
            new = old
        elif new is not None and old is not None:
            new.absorb(old)
        if new is not None and new is not old and not any(new.filled) and self.cache.logical_length:
            recent = list(self.transcript_ids[-min(new.capacity, 64, len(self.transcript_ids)) :])
            self.make_room(self.cache, len(recent), self.compactions)  # the old policy's way
            with self.scratch(self.cache, lambda layer, q: new.push(layer, q, self.cache.forward_positions)):
                self.cache.reserve(len(recent))
                self.forward_chunk(self.cache, recent, "none")
        self.policy = policy
        self.cache.query_buffer = new

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def fork(self) -> Engine:
        """An independent copy: cache, buffers, logs (the model is shared)."""
        import copy

        other = copy.copy(self)
        other.cache = self.cache.clone()  # query buffer included
        other.compactions = list(self.compactions)
        other.pinned = list(self.pinned)
        other.transcript_ids = array("i", self.transcript_ids)
        other.pending = list(self.pending)
        return other

    def make_room(self, cache: CompactedCache, n: int, record: list[CompactionEvent] | None) -> None:
        """Ensure n more tokens fit: trim dead sliding-window entries, fix positions, compact if needed."""
        cache.trim_sliding(n)
        maintain(cache, n, self.positions)
        if not cache.fits(n):
            cache.trim_sliding(n, min_dead=0)
        for _ in range(_MAX_COMPACTIONS_PER_STEP):
            if cache.fits(n):
                break
            plan = self.policy.plan_for_budget(cache, n, self.pinned)
            # release what the compaction freed: with uneven heads, a head that kept all its entries
            # can only grow into memory given back by the others (even heads refill their own slots)
            event = self.compact(cache, plan, self.policy.method, record, spare=n, uneven_only=True)
            if event.payload_bytes_after >= event.payload_bytes_before:
                break
        if not cache.fits(n):
            raise BudgetError(
                f"policy {self.policy.name!r} could not make room for {n} tokens within "
                f"{cache.max_bytes / MiB:.2f} MiB; raise max_kv_mb or lower chunk_tokens"
            )
        cache.reserve(n)

    def compact(
        self,
        cache: CompactedCache,
        plan: CompactionPlan,
        method,
        record: list[CompactionEvent] | None,
        *,
        source: str | None = None,
        groups: int = 1,
        planner: Policy | None = None,
        spare: int = 0,
        uneven_only: bool = False,
    ) -> CompactionEvent:
        """Apply a plan (:meth:`execute`), give back the capacity it freed (keeping ``spare`` slots
        per head; ``uneven_only``: only in layers whose heads differ) and log the event in ``record``."""
        with cache.releasing(spare, uneven_only):  # layers rebuilt by the writes: already at that size
            event = self.execute(cache, plan, method, source, groups, planner)
        cache.shrink_to_fit(spare=spare, uneven_only=uneven_only)
        event.kv_bytes_after = cache.kv_bytes
        if record is not None:
            record.append(event)
        return event

    def execute(
        self,
        cache: CompactedCache,
        plan: CompactionPlan,
        method,
        source: str | None = None,
        groups: int = 1,
        planner: Policy | None = None,
    ) -> CompactionEvent:
        """Gather the reference queries the method needs, then apply the plan.

        ``planner``: the policy that made the plan (default: the session's), named in the receipt.

        ``groups > 1`` (on-policy): layers are compacted in that many consecutive groups, and the
        queries of each group are recomputed by the model with the groups below already compacted.
        Only query sources that run the model (repeat-prefill, self-study) can be on-policy.
        """
        planner = planner or self.policy
        source = source or plan.queries or "recent"
        t0 = time.perf_counter()
        queries, notes, phases, prepared = None, [], {}, 0
        if plan.budgets and method.needs_queries:  # per-context head budgets: from the queries, once
            queries, notes = self.queries(cache, plan, source)
            t1 = time.perf_counter()
            report = CompactionReport(work_limit=self._method_limit(queries))
            method.prepare(cache, plan.requests, queries, report)  # the method's own pass scores the entries once
            planner.allocate(plan, cache, queries, report)
            phases, prepared = {"queries": t1 - t0, "scores": time.perf_counter() - t1}, report.work_bytes
        if method.needs_queries and groups > 1 and source in ("repeat-prefill", "self-study"):
            event = self._execute_on_policy(cache, plan, method, source, groups, planner.name)
        else:
            if method.needs_queries and queries is None:
                t1 = time.perf_counter()
                queries, notes = self.queries(cache, plan, source)
                phases["queries"] = time.perf_counter() - t1
            event = execute_plan(cache, plan, method, planner.name, queries, self._method_limit(queries))
            pass_bytes = queries.pass_bytes if queries is not None else 0
            event.work_bytes = max(event.work_bytes, prepared, pass_bytes) + _scratch_bytes(queries)
        for phase, seconds in phases.items():
            event.phases[phase] = event.phases.get(phase, 0.0) + seconds
        event.work_limit = self.work_limit
        if self.work_limit is not None and event.work_bytes > self.work_limit:
            event.notes.append(
                f"held {event.work_bytes / MiB:.2f} MiB beside the cache, over max_work_mb="
                f"{self.work_limit / MiB:.2f}: one layer's replacements and one batch of fits are the least it holds"
            )
        event.seconds = time.perf_counter() - t0  # query generation and allocation included
        event.notes[:0] = notes
        if planner.head_budgets != "uniform" or plan.budgets:
            event.notes.append(f"head budgets: {plan.budgets or planner.budgets_description}")
        return event

    def _execute_on_policy(
        self, cache: CompactedCache, plan: CompactionPlan, method, source: str, groups: int, name: str
    ) -> CompactionEvent:
        layers = sorted({r.layer for r in plan.requests})
        size = -(-len(layers) // groups)
        events: list[CompactionEvent] = []
        cache.begin()  # every group or none
        try:
            for g in range(0, len(layers), size):
                part = set(layers[g : g + size])
                sub = CompactionPlan(plan.reason, [r for r in plan.requests if r.layer in part], plan.queries)
                sub.query_tokens, sub.query_dtype = plan.query_tokens, plan.query_dtype
                t0 = time.perf_counter()
                queries, notes = self.queries(cache, sub, source)
                events.append(execute_plan(cache, sub, method, name, queries, self._method_limit(queries)))
                events[-1].work_bytes = max(events[-1].work_bytes, queries.pass_bytes) + _scratch_bytes(queries)
                events[-1].notes[:0] = notes
                events[-1].phases["queries"] = time.perf_counter() - t0 - events[-1].seconds
        except BaseException:
            cache.abort()
            raise
        cache.commit()
        first, last = events[0], events[-1]
        last.tokens_before, last.kv_bytes_before = first.tokens_before, first.kv_bytes_before
        last.payload_bytes_before = first.payload_bytes_before
        last.seconds = sum(e.seconds for e in events)
        last.phases = {p: sum(e.phases.get(p, 0.0) for e in events) for p in {p for e in events for p in e.phases}}
        last.work_bytes = max(e.work_bytes for e in events)
        last.span_tokens = sum(e.span_tokens for e in events) / len(events)
        last.notes = [n for e in events for n in e.notes] + [f"on-policy: {len(events)} layer groups"]
        fits = [e.fit_output_error for e in events if e.fit_output_error is not None]
        last.fit_output_error = sum(fits) / len(fits) if fits else None
        masses = [e.fit_mass_error for e in events if e.fit_mass_error is not None]
        last.fit_mass_error = sum(masses) / len(masses) if masses else None
        return last

    def _method_limit(self, queries: QuerySet | None) -> int | None:
        """What a method may hold at once: the work limit less the scratch queries held beside it."""
        if self.work_limit is None:
            return None
        return max(self.work_limit // 8, self.work_limit - _scratch_bytes(queries))

    def queries(self, cache: CompactedCache, plan: CompactionPlan, source: str) -> tuple[QuerySet, list[str]]:
        notes = []
        dtype = reference.pass_dtype(plan.query_dtype, cache.device, self.loaded.dtype)  # of a scratch pass
        tokens = plan.query_tokens if source == "repeat-prefill" else reference.SELF_STUDY_TOKENS
        if self.work_limit is not None and source in ("repeat-prefill", "self-study"):  # half the work limit at most
            spec = self.loaded.spec
            per_token = spec.num_layers * spec.num_q_heads * spec.head_dim * dtype.itemsize
            if self.work_limit // 2 // per_token < tokens:
                tokens = self.work_limit // 2 // per_token
                notes.append(f"{source} queries capped at {tokens} tokens by max_work_mb={self.work_limit / MiB:.2f}")
        if source == "repeat-prefill":
            limit = None if self.work_limit is None else self.work_limit // 2  # the queries take the other half
            qs = reference.repeat_prefill(self, cache, plan, max_tokens=tokens, dtype=dtype, max_pass_bytes=limit)
            if qs is not None:
                return qs, notes
            notes.append("no room in the budget (or the work limit) for a repeat-prefill pass; used buffered queries")
        elif source == "self-study":
            qs = reference.self_study(self, cache, dtype=dtype, max_tokens=tokens)
            if qs is not None:
                return qs, notes
            notes.append("no room in the budget (or the work limit) for self-study; used buffered queries")
        buffer = cache.query_buffer
        if buffer is None or not any(buffer.filled):
            raise CompactionError(
                f"no reference queries for {source!r}: the session has no query buffer yet (read some text first)"
            )
        if source in ("recent", "context") and buffer.mode != source:
            notes.append(f"asked for {source!r} queries, the session buffers {buffer.mode!r} ones")
        return buffer.query_set(), notes

    def forward_chunk(self, cache: CompactedCache, chunk: Sequence[int], keep: str) -> torch.Tensor | None:
        """One model call on ``chunk`` (room must already be reserved); logits per ``keep``.

        keep: "none", "last" ((V,)) or "all" ((n, V)), fp32. A failed call leaves the cache as it was.
        """
        n = len(chunk)
        snapshot = cache.snapshot_lengths()
        position_ids = cache.begin_forward(n)
        try:
            logits = model_call(self.loaded, [chunk], position_ids, cache, keep)
        except BaseException:
            cache.rollback(snapshot)
            raise
        cache.commit_forward(n)
        if keep == "all":
            return logits[0].float()
        return logits[0, -1].float() if keep == "last" else None

    def run(
        self,
        cache: CompactedCache,
        ids: Sequence[int],
        keep: str,
        record: list[CompactionEvent] | None,
    ) -> torch.Tensor | None:
        """Run tokens through the model in budget-sized chunks, making room (compacting) before each.

        keep: "none", "last" (logits of the last token, (V,)) or "all" ((len(ids), V)), fp32.
        """
        out: list[torch.Tensor] = []
        last = None
        for start in range(0, len(ids), self.chunk_tokens):
            chunk = ids[start : start + self.chunk_tokens]
            self.make_room(cache, len(chunk), record)
            final = start + len(chunk) >= len(ids)
            logits = self.forward_chunk(cache, chunk, keep if keep == "all" or final else "none")
            if keep == "all":
                out.append(logits)
            elif final and keep == "last":
                last = logits
        if keep == "all":
            return torch.cat(out, dim=0) if out else None
        return last

    def make_room_and_begin(self, cache: CompactedCache, n: int, record: list[CompactionEvent] | None):
        """What :meth:`forward_chunk` does before its model call, for a caller that batches calls."""
        self.make_room(cache, n, record)
        return cache.snapshot_lengths(), cache.begin_forward(n)

    @contextmanager
    def scratch(self, cache: CompactedCache, observer=None):
        """Run forwards on ``cache`` that leave no trace: lengths, logical length and the query buffer
        are restored (or untouched) afterwards. ``observer(layer, query)`` sees the queries."""
        lengths, logical = cache.snapshot_lengths(), cache.logical_length
        previous = cache.query_observer
        cache.query_observer = observer if observer is not None else _ignore_queries
        try:
            yield cache
        finally:
            cache.rollback(lengths)
            cache.logical_length = logical
            cache.query_observer = previous


def _ignore_queries(layer: int, query: torch.Tensor) -> None:
    return None


def _nbytes(buffer: QueryBuffer | None) -> int:
    return buffer.nbytes if buffer is not None else 0


def _scratch_bytes(queries: QuerySet | None) -> int:
    """Bytes of queries a scratch pass made for one compaction (buffered ones are views: 0)."""
    if queries is None or queries.source not in ("repeat-prefill", "self-study"):
        return 0
    return queries.nbytes


def model_call(
    loaded: LoadedModel, rows: Sequence[Sequence[int]], position_ids, cache, keep: str
) -> torch.Tensor | None:
    """The model's forward on ``rows`` (B, n) token ids at ``position_ids`` over ``cache`` (one
    CompactedCache, or BatchedCaches for B > 1); logits (B, n or 1, V) as the model returns them.
    ``keep="none"``: the decoder alone, no LM head (None): nothing reads the logits, and under a bf16
    autocast the LM head's cast alone took ~60 MiB for the default model."""
    input_ids = torch.tensor([list(r) for r in rows], dtype=torch.long, device=loaded.device)
    with torch.inference_mode():
        if keep == "none" and loaded.decoder is not loaded.model:
            loaded.decoder(
                input_ids=input_ids,
                position_ids=position_ids,
                use_cache=True,
                agentmem_cache=cache,
                **{loaded.decoder_cache_keyword: cache},
            )
            return None
        return loaded.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=True,
            agentmem_cache=cache,
            logits_to_keep=0 if keep == "all" else 1,
            **{loaded.cache_keyword: cache},
        ).logits
