"""The Attention Matching method: compacts the spans of a plan, chunked, batched across layers and heads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import CompactionError
from ..kv.cache import CompactedCache
from ..kv.layer import Block
from ..units import MiB
from .fit import REDUCTIONS, attention_match
from .plan import QUERY_CAP, CompactionReport, Replacement, SpanRequest, split_target
from .queries import QuerySet
from .scores import WORK_BYTES, block_bytes, fixed_bytes, head_pass, held_bytes

_T_BUCKET = 64  # chunks whose targets differ by less than this are fitted in one padded batch


class Chunk(NamedTuple):
    """One chunk of a span and what it keeps: ``target`` entries, already chosen (``selected``
    slots, span-wide ranking) or left to the fit (None); ``fit_rows``: the query rows that fit it
    (None: the layer's random subset)."""

    start: int
    end: int
    target: int
    selected: torch.Tensor | None = None
    fit_rows: torch.Tensor | None = None


class FitJob(NamedTuple):
    """A chunk of KV head ``head`` of ``requests[request]`` to fit, with the query rows that fit it."""

    request: int
    head: int
    chunk: Chunk
    fit_rows: torch.Tensor


def split_chunks(start: int, end: int, target: int, chunk: int) -> list[tuple[int, int, int]]:
    """Split [start, end) into near-equal chunks of at most ``chunk`` slots, sharing ``target``
    entries in proportion (largest remainder). Returns (start, end, target) per chunk."""
    length = end - start
    n = max(1, -(-length // chunk))
    bounds = [start + (length * i) // n for i in range(n + 1)]
    out = split_target([bounds[i + 1] - bounds[i] for i in range(n)], target)
    return [(bounds[i], bounds[i + 1], out[i]) for i in range(n)]


@dataclass
class AttentionMatching:
    """Attention Matching (Zweiger et al., "Fast KV Compaction via Attention Matching",
    arXiv 2602.16284): each span of each KV head, split into independent chunks of at most
    ``chunk`` slots, is replaced by t compact entries -- selected keys C_k = K[idx] (keeping their
    positions), a fitted fp32 bias beta and least-squares values C_v -- that reproduce the chunk's
    attention output and mass for the reference queries (compaction/fit.py).

    Queries: (H_q, n, d) per layer from a QuerySet; the GQA group of each KV head is stacked and
    capped at ``query_cap`` rows for key selection, ``fit_query_cap`` of them for the fits.
    Keys are ranked in one pass per head (compaction/scores.py; shared with the global head
    budgets through :meth:`prepare`); chunks of all layers and heads with the same length and
    similar targets are fitted in a few batched calls. A head whose value fit fails keeps copied
    values, and the report says so.
    """

    name: str = "am"
    needs_queries: bool = True
    selection: str = "highest"
    omp_step: int = 8
    chunk: int = 512
    query_cap: int = QUERY_CAP  # reference queries per KV head for key selection
    fit_query_cap: int = 512  # of those, the ones that attend most to a chunk fit its beta and values
    ridge: float = 1.0
    beta_ridge: float = 1e-2
    beta_iters: int = 5
    fit_beta: bool = True  # False: beta = 0 (ablation: plain selection)
    fit_values: bool = True  # False: copied values V[idx] (ablation)
    span_selection: bool = True  # rank keys over the whole span, not chunk by chunk
    selection_dtype: str = "float32"  # products for ranking keys: "float32", "bfloat16" or "auto" (bf16 on CUDA)
    seed: int = 0
    work_bytes: int = 8 * MiB  # logits (B x n x T fp32) of one batched fit at most this (small batches stay in cache)

    def _ranks(self) -> bool:
        """Whether keys are ranked span-wide (highest attention), from a pass over the whole head."""
        return self.span_selection and self.selection in REDUCTIONS

    def _queries(self, cache: CompactedCache, queries: QuerySet | None, layer_idx: int) -> torch.Tensor:
        """(H_kv, n, d) the layer's reference queries per KV head."""
        if queries is None or layer_idx not in queries.per_layer:
            raise CompactionError(f"attention matching needs reference queries for layer {layer_idx}")
        layer = cache.layers[layer_idx]
        return queries.for_kv_heads(layer_idx, layer.num_heads, self.query_cap, self.seed).to(layer.device)

    def _rank_spans(self, request: SpanRequest, h: int) -> list[tuple[int, int, list[int]]]:
        """Head h's spans to rank, with their chunk edges (none unless keys are ranked span-wide)."""
        if not self._ranks():
            return []
        return [
            (start, end, [cs for cs, _, _ in split_chunks(start, end, 0, self.chunk)] + [end])
            for start, end, _ in request.heads[h]
            if end > start
        ]

    def _score(
        self,
        cache: CompactedCache,
        requests: list[SpanRequest],
        qs: list[torch.Tensor],
        pairs: list[tuple[int, int]],
        entry: bool,
        report: CompactionReport,
    ) -> None:
        """One pass of each (request, head)'s queries over its entries (compaction/scores.py): the
        span rankings (``request.ranked``) and, with ``entry``, the entries' max weights
        (``request.scores``). Heads of one length, spans and query count -- across layers -- go in
        one batched call, as many as fit in the working memory of the pass (``report.limit``)."""
        # a batch's stacked keys and queries, a block of its logits and their weights: a third each at most
        work = report.limit(3 * WORK_BYTES) // 3
        groups: dict[tuple, list[tuple[int, int, list]]] = {}
        for r, h in pairs:
            request = requests[r]
            spans = self._rank_spans(request, h)
            if spans or entry:
                length = cache.layers[request.layer].lengths[h]
                key = (length, tuple((a, b) for a, b, _ in spans), qs[r].shape[1], cache.spec.scaling[request.layer])
                groups.setdefault(key, []).append((r, h, spans))
        for (length, _, n, scale), members in groups.items():
            d = qs[members[0][0]].shape[-1]
            # the stacked keys and queries of a batch fit the working memory, and so do the logits of
            # >= 1024 queries of each head (long heads go alone: a batch buys them nothing)
            size = max(1, work // (4 * max(d * (length + n), 1024 * length)))
            for a in range(0, len(members), size):
                batch = members[a : a + size]
                layers = [cache.layers[requests[r].layer] for r, _, _ in batch]
                k = torch.stack([layer.head("k", h)[:length] for layer, (_, h, _) in zip(layers, batch)])
                beta = torch.stack([layer.head("beta", h)[:length] for layer, (_, h, _) in zip(layers, batch)])
                q = torch.stack([qs[r][h] for r, h, _ in batch])
                chunks = sum(len(edges) - 1 for _, _, edges in batch[0][2])
                fixed = fixed_bytes(len(batch), length, n, d, chunks)
                kept = sum(r.held_bytes for r in requests)
                logits = work  # a block of logits (and as many weights)
                if report.work_limit is not None:  # what the stacked heads, shares and rankings leave of the bound
                    logits = min(work, max(4 * len(batch) * length, (report.work_limit - fixed - kept) // 2))
                logits = block_bytes(k.device, logits)
                scores, ranked = head_pass(
                    k,
                    beta,
                    q,
                    scale,
                    "max" if entry else None,
                    batch[0][2],
                    REDUCTIONS.get(self.selection, "rms"),
                    dtype=_selection_dtype(self.selection_dtype, k.device),
                    work_bytes=logits,
                )
                report.held(held_bytes(len(batch), length, n, d, chunks, logits) + kept)
                for b, (r, h, _) in enumerate(batch):
                    if entry:
                        requests[r].scores[h] = scores[b]
                    for sc in ranked[b]:  # only the fit rows of the shares are kept (less to hold)
                        requests[r].ranked[(h, sc.start, sc.end)] = sc.top_queries(self.fit_query_cap)

    def prepare(
        self, cache: CompactedCache, requests: list[SpanRequest], queries: QuerySet, report: CompactionReport
    ) -> None:
        """Score every requested head in one pass before the global head budgets are set: the
        allocation reads ``request.scores``, the key selection later reads ``request.ranked``."""
        scored = [r for r in requests if r.layer in queries.per_layer]
        qs = [self._queries(cache, queries, r.layer) for r in scored]
        pairs = [(i, h) for i, r in enumerate(scored) for h in range(len(r.heads))]
        self._score(cache, scored, qs, pairs, True, report)

    def _chunks(self, request: SpanRequest, h: int, start: int, end: int, target: int) -> list[Chunk]:
        """Split one span into chunks, each with its own target (and, span-wide, its selected keys).

        With a highest-attention selection and ``span_selection``, keys are ranked under the
        span-wide softmax and the top ``target`` are kept wherever they are: a chunk that matters
        more keeps more, and is fitted on the queries that attend to it most. Otherwise (OMP) every
        chunk keeps a share proportional to its length, fitted on a random subset of the queries.
        """
        if not self._ranks() or target in (0, end - start):
            return [Chunk(cs, ce, ct) for cs, ce, ct in split_chunks(start, end, target, self.chunk)]
        ranked = request.ranked[(h, start, end)]
        chosen = torch.topk(ranked.keys, target).indices.sort().values + start
        out = []
        for i, (cs, ce, _) in enumerate(split_chunks(start, end, 0, self.chunk)):
            sel = chosen[(chosen >= cs) & (chosen < ce)]
            # fit on the queries that attend to this chunk the most (all of them when there are no more
            # than fit_query_cap): for the others its share of attention is small, and so is the
            # effect of its compaction error
            out.append(Chunk(cs, ce, int(sel.numel()), sel, ranked.fit_rows(i, self.fit_query_cap)))
        return out

    def compact(
        self, cache: CompactedCache, request: SpanRequest, queries: QuerySet | None, report: CompactionReport
    ) -> list[list[Replacement]]:
        return self.compact_all(cache, [request], queries, report)[0]

    def compact_all(
        self, cache: CompactedCache, requests: list[SpanRequest], queries: QuerySet | None, report: CompactionReport
    ) -> list[list[list[Replacement]]]:
        """Select the keys of every (layer, head, chunk), then fit all chunks of one shape -- across
        layers -- in a few batched calls of at most ``work_bytes`` of logits each."""
        t0 = time.perf_counter()
        jobs: dict[tuple, list[FitJob]] = {}  # by (length, target bucket, fit rows, scale): one shape per batch
        qs = [self._queries(cache, queries, request.layer) for request in requests]
        unranked = [
            (r, h)
            for r, request in enumerate(requests)
            for h, spans in enumerate(request.heads)
            if self._ranks() and any(0 < t < e - s and (h, s, e) not in request.ranked for s, e, t in spans)
        ]
        self._score(cache, requests, qs, unranked, False, report)
        plans = []
        for r, request in enumerate(requests):
            q = qs[r]
            # the fits cost n t^2: when a chunk gives no better choice, they use a random subset of queries
            g = torch.Generator().manual_seed(self.seed * 7919 + request.layer)
            random_rows = torch.randperm(q.shape[1], generator=g)[: self.fit_query_cap].sort().values.to(q.device)
            head_plan = []
            for h, spans in enumerate(request.heads):
                chunks_of = []
                for start, end, target in spans:
                    chunks = self._chunks(request, h, start, end, target) if end > start else []
                    chunks_of.append((start, end, chunks))
                    for c in chunks:
                        if 0 < c.target < c.end - c.start:
                            rows = random_rows if c.fit_rows is None else c.fit_rows
                            # span-selected chunks of one length and similar targets share a batch (targets padded)
                            bucket = -1 - c.target // _T_BUCKET if c.selected is not None else c.target
                            key = (c.end - c.start, bucket, rows.numel(), cache.spec.scaling[request.layer])
                            jobs.setdefault(key, []).append(FitJob(r, h, c, rows))
                head_plan.append(chunks_of)
            plans.append(head_plan)
        t1 = time.perf_counter()
        report.timed("scores", t1 - t0)

        fitted: dict[tuple[int, int, int], Block] = {}
        ranking = sum(r.held_bytes for r in requests)  # held until the fits are done
        for (length, _, n_fit, scale), members in jobs.items():
            size = self.work_bytes // (4 * n_fit * length)  # logits of a batch: a speed choice
            if report.work_limit is not None:  # all a batch holds (logits, weights, products): a memory bound
                size = min(size, (report.work_limit - ranking) // (3 * 4 * n_fit * length))
            size = max(1, size)
            for a in range(0, len(members), size):
                batch = members[a : a + size]
                report.held(3 * 4 * len(batch) * n_fit * length + ranking)  # logits, weights and their products
                self._fit(cache, requests, qs, batch, scale, fitted, report)
        report.timed("fits", time.perf_counter() - t1)

        out = []
        for r, head_plan in enumerate(plans):
            layer = cache.layers[requests[r].layer]
            per_head: list[list[Replacement]] = []
            for h, chunks_of in enumerate(head_plan):
                spans_out = []
                for start, end, chunks in chunks_of:
                    parts = []
                    for c in chunks:
                        if c.target == 0:
                            continue
                        full = c.target == c.end - c.start
                        parts.append(layer.read_span(h, c.start, c.end) if full else fitted[(r, h, c.start)])
                    spans_out.append((start, end, _concat(parts)))
                per_head.append(spans_out)
            out.append(per_head)
        return out

    def _fit(
        self,
        cache: CompactedCache,
        requests: list[SpanRequest],
        qs: list[torch.Tensor],
        batch: list[FitJob],
        scale: float,
        fitted: dict[tuple[int, int, int], Block],
        report: CompactionReport,
    ) -> None:
        """Fit one batch of chunks of one length (from any layers) in one :func:`attention_match` call."""
        batch = sorted(batch, key=lambda m: m.request)  # one gather per layer
        device = qs[batch[0].request].device
        slots = torch.stack([torch.arange(m.chunk.start, m.chunk.end, device=device) for m in batch])  # (B, T)
        k, v, bias = [], [], []
        for r in dict.fromkeys(m.request for m in batch):
            rows = [b for b, m in enumerate(batch) if m.request == r]
            layer = cache.layers[requests[r].layer]
            heads = torch.tensor([batch[b].head for b in rows], device=device)
            k.append(layer.gather("k", heads, slots[rows]))  # (b, T, d)
            v.append(layer.gather("v", heads, slots[rows]))
            bias.append(layer.gather("beta", heads, slots[rows]))  # (b, T) fp32, the beta the entries carry
        t = max(m.chunk.target for m in batch)
        given = given_mask = None
        if batch[0].chunk.selected is not None:  # (B, t) positions within the chunk, padded to the longest
            given = torch.zeros(len(batch), t, dtype=torch.long, device=device)
            given_mask = torch.zeros(len(batch), t, dtype=torch.bool, device=device)
            for b, m in enumerate(batch):
                given[b, : m.chunk.target] = m.chunk.selected - m.chunk.start
                given_mask[b, : m.chunk.target] = True
        q_fit = torch.stack([qs[m.request][m.head][m.fit_rows] for m in batch]).float()  # (B, n_fit, d)
        res = attention_match(
            q_fit,
            torch.cat(k),
            torch.cat(v),
            t,
            scale,
            bias=torch.cat(bias),
            selection=self.selection,
            omp_step=self.omp_step,
            beta_iters=self.beta_iters,
            ridge=self.ridge,
            beta_ridge=self.beta_ridge,
            fit_beta=self.fit_beta,
            fit_values_=self.fit_values,
            idx=given,
            idx_mask=given_mask,
        )
        sel_slots = torch.gather(slots, 1, res.idx)
        for b, m in enumerate(batch):
            layer_idx = requests[m.request].layer
            layer = cache.layers[layer_idx]
            h, cs, n_keep = m.head, m.chunk.start, m.chunk.target
            s = sel_slots[b, :n_keep]
            fitted[(m.request, h, cs)] = Block(
                keys=layer.head("k", h)[s],
                values=res.values[b, :n_keep].to(layer.dtype),
                beta=res.beta[b, :n_keep],
                pos=layer.head("pos", h)[s],
                tok=layer.head("tok", h)[s],
            )
            if not bool(res.values_ok[b]):
                report.notes.append(f"layer {layer_idx} head {h} slots {cs}+: value fit failed, copied values")
        report.output_errors += res.output_error.tolist()
        report.mass_errors += res.mass_error.tolist()


def _selection_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # on CPU the conversions cost more


def _concat(parts: list[Block]) -> Block | None:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return Block(*(torch.cat(field) for field in zip(*(p.fields for p in parts))))
