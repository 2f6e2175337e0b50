"""Per-entry attention scores: the softmax weight each stored entry gets from reference queries.

One pass of a KV head's reference queries over its entries (:func:`head_pass`) gives everything a
compaction ranks by, from the same softmax weights:

* ``entry``: each entry's largest (or summed) weight under the head's *full* softmax (all its
  entries, beta included), so that scores of different heads are comparable -- the global head
  budgets (ranking across heads and layers) and the scored-eviction baselines use it;
* per span: each entry's RMS / max / mean weight under the span's *own* softmax (the span-wide
  ranking of Attention Matching's key selection) and each query's share of attention on each chunk
  of the span (which queries fit which chunk).

The queries are taken a block at a time so the working set is a few MiB whatever the context
(``work_bytes``), never the n x L matrix of all scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..units import MiB

if TYPE_CHECKING:
    from ..kv.cache import CompactedCache

WORK_BYTES = 16 * MiB  # fp32 scores of one block of queries over the head's entries
# On a CPU a block's logits and weights are read and written ~7 times (softmax, max, chunk sums,
# squares), and smaller blocks ran faster up to a point. Measured, not modelled (2-core x86, 2 MiB
# L2 per core; scoring inside compact(0.5), one process, interleaved): at 2k entries 8 and 4 MiB
# blocks took 0.72x the time of 16 MiB ones; at 4k, 8 MiB 0.90x, 4 MiB 1.05x (noise ~10%).
CPU_BLOCK_BYTES = 8 * MiB
_TINY_MASS = 1e-30  # a query whose weight on a span underflowed: its span softmax is recomputed


class WorkReport(Protocol):
    """What a scoring pass needs of its caller's report (compaction/plan.py ``CompactionReport``)."""

    def limit(self, default: int) -> int: ...

    def held(self, nbytes: int) -> None: ...


@dataclass
class SpanScores:
    """Scores of span [start, end) of one head: ``keys`` (T,) fp32 under the span's own softmax
    (-1 where the entry's beta is -inf) and ``shares`` (chunks, n) each query's attention share on
    each chunk of the span (rows sum to 1 over chunks) -- or, once only the top ones matter
    (:meth:`top_queries`), ``rows`` (chunks, k) the k queries with the largest share per chunk."""

    start: int
    end: int
    keys: torch.Tensor
    shares: torch.Tensor | None
    rows: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.shares, self.rows) if t is not None)

    def top_queries(self, k: int) -> SpanScores:
        """The same scores keeping, per chunk, only the indices of the k queries with the largest
        share (ascending) instead of every query's share; itself unless that takes less memory."""
        if self.shares is None or 8 * k >= 4 * self.shares.shape[1]:  # int64 rows vs fp32 shares
            return self
        return SpanScores(self.start, self.end, self.keys, None, _top_rows(self.shares, k))  # rows (chunks, k)

    def fit_rows(self, chunk: int, k: int) -> torch.Tensor | None:
        """Indices (ascending) of the at most k queries with the largest share on one chunk of the
        span; None when every query is among them."""
        if self.rows is not None:
            return self.rows[chunk]
        if self.shares is None or self.shares.shape[1] <= k:
            return None
        return _top_rows(self.shares[chunk], k)


def _top_rows(shares: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) shares -> (..., k) indices of the k largest along the last axis, ascending."""
    return torch.topk(shares, k, dim=-1).indices.sort(dim=-1).values


def head_pass(
    k: torch.Tensor,
    beta: torch.Tensor,
    q: torch.Tensor,
    scale: float,
    entry: str | None = "max",
    spans: list[tuple[int, int, list[int]]] = (),
    span_reduce: str = "rms",
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    work_bytes: int = WORK_BYTES,
) -> tuple[torch.Tensor | None, list[list[SpanScores]]]:
    """One pass of queries q (B, n, d) over B heads' entries k (B, L, d) with bias beta (B, L) fp32.

    ``entry``: "max" or "sum" of each entry's weight under the full softmax -> (B, L) (None: skip).
    ``spans`` (the same for every head): (start, end, chunk edges start < e_1 < ... < end) -> per
    head, one :class:`SpanScores` each, reduced by ``span_reduce`` ("rms", "max" or "mean") over
    the queries. ``q_pos`` (n,) with ``k_pos`` (B, L): causal, a query sees only entries at
    positions <= its own (a query that sees nothing adds nothing). ``dtype``: of the q k products
    (bf16 for a fast ranking); fp32 out. Queries go a block at a time: B x block x L fp32 logits
    fit in ``work_bytes``.
    """
    if span_reduce not in ("rms", "max", "mean"):
        raise ValueError(f"unknown score reduction {span_reduce!r}: use 'rms', 'max' or 'mean'")
    heads, n, length = q.shape[0], q.shape[1], k.shape[1]
    dev = k.device
    kt = k.to(dtype).transpose(1, 2)  # (B, d, L)
    bias = beta.float()[:, None, :]  # (B, 1, L)
    # a row of weights is NaN only if every entry it sees is masked (-inf beta, or causal)
    may_empty = q_pos is not None or bool((~torch.isfinite(beta)).any())
    entry_out = torch.zeros(heads, length, device=dev) if entry else None
    acc = [torch.zeros(heads, e - s, device=dev) for s, e, _ in spans]
    shares = [torch.empty(heads, len(edges) - 1, n, device=dev) for _, _, edges in spans]
    block = _block_rows(heads, length, n, work_bytes)
    for a in range(0, n, block):
        qb = q[:, a : a + block].to(dtype)
        if dtype == torch.float32:
            s = torch.baddbmm(bias, qb, kt, alpha=scale)  # (B, b, L)
        else:  # bf16 products, fp32 logits
            s = torch.bmm(qb, kt).float().mul_(scale).add_(bias)
        if q_pos is not None:  # causal
            s.masked_fill_(k_pos[:, None, :] > q_pos[None, a : a + block, None].to(dev), float("-inf"))
        w = torch.softmax(s, dim=-1)  # (B, b, L)
        if may_empty:  # a fully masked row is NaN: no weight
            w.nan_to_num_(0.0)
        if entry == "max":
            entry_out = torch.maximum(entry_out, w.amax(dim=1))
        elif entry == "sum":
            entry_out += w.sum(dim=1)
        # the span's own softmax is w[..., span] / mass: reductions over queries as products with 1 / mass
        inv = []
        for i, (start, end, edges) in enumerate(spans):
            ws = w[:, :, start:end]
            mass = ws.sum(dim=-1)  # (B, b) the span's share of each query's attention
            low = mass < _TINY_MASS  # underflowed in the full softmax: that query's span softmax is recomputed
            inv_m = torch.where(low, 0.0, 1.0 / mass.clamp_min(_TINY_MASS))
            rel_low = torch.softmax(s[low][:, start:end], dim=-1).nan_to_num_(0.0) if bool(low.any()) else None
            for c in range(len(edges) - 1):
                part = ws[:, :, edges[c] - start : edges[c + 1] - start].sum(dim=-1) * inv_m  # (B, b)
                if rel_low is not None:
                    part[low] = rel_low[:, edges[c] - start : edges[c + 1] - start].sum(dim=-1)
                shares[i][:, c, a : a + block] = part
            if span_reduce == "max":
                acc[i] = torch.maximum(acc[i], (ws * inv_m[..., None]).amax(dim=1))
            elif span_reduce == "mean":
                acc[i] += torch.bmm(inv_m[:, None, :], ws)[:, 0]
            if rel_low is not None:  # rows of the heads they belong to
                owner = low.nonzero()[:, 0]
                acc[i] = _reduce_into(acc[i], rel_low, owner, span_reduce)
            inv.append(inv_m)
        if span_reduce == "rms" and spans:
            w.square_()  # w is not needed any more
            for i, (start, end, _) in enumerate(spans):
                acc[i] += torch.bmm(inv[i].square()[:, None, :], w[:, :, start:end])[:, 0]
    out: list[list[SpanScores]] = [[] for _ in range(heads)]
    for i, (start, end, _) in enumerate(spans):
        keys = acc[i]
        if span_reduce == "rms":
            keys = keys.div_(max(n, 1)).sqrt_()
        elif span_reduce == "mean":
            keys = keys.div_(max(n, 1))
        keys = keys.masked_fill(~torch.isfinite(beta[:, start:end]), -1.0)
        for b in range(heads):
            out[b].append(SpanScores(start, end, keys[b], shares[i][b]))
    return entry_out, out


def _reduce_into(acc: torch.Tensor, rel: torch.Tensor, owner: torch.Tensor, reduce: str) -> torch.Tensor:
    """Add rows of span softmax weights rel (r, T), row i of head owner[i], into a running
    reduction (B, T) over queries."""
    if reduce == "max":  # rare (underflowed rows): a loop over the heads concerned
        acc = acc.clone()
        for b in owner.unique().tolist():
            acc[b] = torch.maximum(acc[b], rel[owner == b].amax(dim=0))
        return acc
    return acc.index_add(0, owner, rel.square() if reduce == "rms" else rel)


def block_bytes(device: torch.device, work_bytes: int) -> int:
    """The logits bytes a block of :func:`head_pass` should take on ``device``: ``work_bytes`` (the
    memory a caller allows), at most :data:`CPU_BLOCK_BYTES` on a CPU (a speed choice: see there)."""
    return min(work_bytes, CPU_BLOCK_BYTES) if device.type == "cpu" else work_bytes


def _block_rows(heads: int, length: int, n: int, work_bytes: int) -> int:
    """Queries per block of :func:`head_pass`: heads x rows x length fp32 logits fit ``work_bytes``."""
    return max(1, min(n, work_bytes // max(1, 4 * heads * length)))


def fixed_bytes(heads: int, length: int, n: int, d: int, chunks: int) -> int:
    """What :func:`head_pass` holds besides its block of logits: the heads' keys and queries, fp32,
    and each query's share per chunk of its spans."""
    return 4 * heads * (d * (length + n) + chunks * n)


def held_bytes(heads: int, length: int, n: int, d: int, chunks: int, work_bytes: int) -> int:
    """What :func:`head_pass` holds for ``heads`` heads of ``length`` entries and ``n`` queries with
    ``work_bytes``: :func:`fixed_bytes` and a block of logits with its weights."""
    return fixed_bytes(heads, length, n, d, chunks) + 2 * 4 * heads * length * _block_rows(heads, length, n, work_bytes)


def entry_scores(
    cache: CompactedCache,
    layer_idx: int,
    h: int,
    q: torch.Tensor,
    reduce: str = "max",
    q_pos: torch.Tensor | None = None,
    report: WorkReport | None = None,
) -> torch.Tensor:
    """Softmax weight each entry of head h gets from queries q (n, d), under the head's full
    softmax (all its entries, beta included): the largest (``reduce="max"``) or the sum over the
    queries (``"sum"``). With ``q_pos`` (n,), causal (see :func:`head_pass`). Returns (L_h,) fp32.
    ``report``: its work limit sizes the blocks of queries, and what the pass holds is recorded."""
    layer = cache.layers[layer_idx]
    n_entries = layer.lengths[h]
    work = WORK_BYTES if report is None else report.limit(2 * WORK_BYTES) // 2  # a block and its weights
    work = block_bytes(layer.device, work)
    if report is not None:
        report.held(held_bytes(1, n_entries, q.shape[0], q.shape[1], 0, work))
    k = layer.head("k", h)[:n_entries].float()  # (L, d)
    beta = layer.head("beta", h)[:n_entries].float()  # (L,)
    k_pos = layer.head("pos", h)[:n_entries].to(torch.long)[None] if q_pos is not None else None
    out, _ = head_pass(
        k[None],
        beta[None],
        q.float()[None],
        cache.spec.scaling[layer_idx],
        reduce,
        q_pos=q_pos,
        k_pos=k_pos,
        work_bytes=work,
    )
    return out[0]
