"""The Attention Matching method: compacts the spans of one layer, chunked, batched over heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import CompactionError
from ..kv.cache import CompactedCache
from ..kv.layer import Block
from ..units import MiB
from .fit import REDUCTIONS, attention_match, block_scores, key_scores, span_key_scores
from .plan import QUERY_CAP, CompactionReport, Replacement, SpanRequest, split_target
from .queries import QuerySet

_SCORE_BYTES = 256 * MiB  # rank a span in one pass when its logits S (n x T fp32) fit in this
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
    """A chunk of KV head ``head`` to fit, with the query rows that fit it."""

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
    Chunks of all heads with the same (length, target) are fitted in
    one batched call. A head whose value fit fails keeps copied values, and the report says so.
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

    def _chunks(self, layer, q: torch.Tensor, scale: float, h: int, start: int, end: int, target: int) -> list[Chunk]:
        """Split one span into chunks, each with its own target (and, span-wide, its selected keys).

        With a highest-attention selection and ``span_selection``, keys are ranked under the
        span-wide softmax and the top ``target`` are kept wherever they are: a chunk that matters
        more keeps more. Otherwise (OMP) every chunk keeps a share proportional to its length.
        The ranking may use bf16 products (``selection_dtype``); the fits are always fp32.
        """
        if not (self.span_selection and self.selection in REDUCTIONS) or target in (0, end - start):
            return [Chunk(cs, ce, ct) for cs, ce, ct in split_chunks(start, end, target, self.chunk)]
        slots = torch.arange(start, end, device=layer.device)
        k, bias = layer.head("k", h)[start:end][None], layer.head("beta", h)[start:end][None]
        reduce = REDUCTIONS[self.selection]
        chunks = split_chunks(start, end, 0, self.chunk)
        shares = None
        if q.shape[1] * (end - start) * 4 <= _SCORE_BYTES:  # one pass over S (n x T)
            dtype = _selection_dtype(self.selection_dtype, layer.device)
            s = block_scores(q[h : h + 1].to(dtype), k.to(dtype), scale, bias)  # (1, n, T) fp32
            w = torch.softmax(s, dim=-1)
            del s
            member = torch.zeros(end - start, len(chunks), device=layer.device)  # (T, chunks) indicator
            for i, (cs, ce, _) in enumerate(chunks):
                member[cs - start : ce - start, i] = 1.0
            shares = (w[0] @ member).T  # (chunks, n): each query's attention share on each chunk
            scores = key_scores(w, reduce, inplace=True)[0].masked_fill(~torch.isfinite(bias[0]), -1.0)
        else:  # a long span: two chunked passes, nothing of size n x T kept
            scores = span_key_scores(q[h : h + 1], k, scale, bias, reduce, self.chunk)[0]
        chosen = slots[torch.topk(scores, target).indices].sort().values
        out = []
        for i, (cs, ce, _) in enumerate(chunks):
            sel = chosen[(chosen >= cs) & (chosen < ce)]
            rows = None
            if shares is not None and q.shape[1] > self.fit_query_cap:
                # fit on the queries that attend to this chunk the most: for the others the chunk's
                # share of attention is small, and so is the effect of its compaction error
                rows = torch.topk(shares[i], self.fit_query_cap).indices.sort().values
            out.append(Chunk(cs, ce, int(sel.numel()), sel, rows))
        return out

    def compact(
        self, cache: CompactedCache, request: SpanRequest, queries: QuerySet | None, report: CompactionReport
    ) -> list[list[Replacement]]:
        layer_idx = request.layer
        layer = cache.layers[layer_idx]
        if queries is None or layer_idx not in queries.per_layer:
            raise CompactionError(f"attention matching needs reference queries for layer {layer_idx}")
        q = queries.for_kv_heads(layer_idx, layer.num_heads, self.query_cap, self.seed).to(layer.device)
        scale = cache.spec.scaling[layer_idx]
        # the fits (beta, values) use a subset of the selection's queries: their cost grows as n t^2
        # the fits cost n t^2: when a chunk gives no better choice, they use a random subset of queries
        g = torch.Generator().manual_seed(self.seed * 7919 + layer_idx)
        random_rows = torch.randperm(q.shape[1], generator=g)[: self.fit_query_cap].sort().values.to(q.device)

        # jobs: one per (head, chunk) to fit, grouped by (length, target) so that a group is one batch
        jobs: dict[tuple[int, int], list[FitJob]] = {}
        plan = []
        for h, spans in enumerate(request.heads):
            head_plan = []
            for start, end, target in spans:
                chunks = self._chunks(layer, q, scale, h, start, end, target) if end > start else []
                head_plan.append((start, end, chunks))
                for c in chunks:
                    if 0 < c.target < c.end - c.start:
                        # span-selected chunks of one length and similar targets share a batch (targets padded)
                        key = (c.end - c.start, -1 - c.target // _T_BUCKET if c.selected is not None else c.target)
                        rows = random_rows if c.fit_rows is None else c.fit_rows
                        jobs.setdefault(key, []).append(FitJob(h, c, rows))
            plan.append(head_plan)

        fitted: dict[tuple[int, int], Block] = {}
        for members in jobs.values():
            heads = torch.tensor([m.head for m in members], device=layer.device)
            slots = torch.stack(
                [torch.arange(m.chunk.start, m.chunk.end, device=layer.device) for m in members]
            )  # (B, T)
            t = max(m.chunk.target for m in members)
            given = given_mask = None
            if members[0].chunk.selected is not None:  # (B, t) positions within the chunk, padded to the longest
                given = torch.zeros(len(members), t, dtype=torch.long, device=layer.device)
                given_mask = torch.zeros(len(members), t, dtype=torch.bool, device=layer.device)
                for b, m in enumerate(members):
                    given[b, : m.chunk.target] = m.chunk.selected - m.chunk.start
                    given_mask[b, : m.chunk.target] = True
            q_fit = torch.stack([q[m.head][m.fit_rows] for m in members])  # (B, n_fit, d)
            k = layer.gather("k", heads, slots)  # (B, T, d)
            v = layer.gather("v", heads, slots)
            bias = layer.gather("beta", heads, slots)  # (B, T) fp32, the beta the entries already carry
            res = attention_match(
                q_fit,
                k,
                v,
                t,
                scale,
                bias=bias,
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
            for b, m in enumerate(members):
                h, cs, n_keep = m.head, m.chunk.start, m.chunk.target
                s = sel_slots[b, :n_keep]
                fitted[(h, cs)] = Block(
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

        out: list[list[Replacement]] = []
        for h, head_plan in enumerate(plan):
            spans_out = []
            for start, end, chunks in head_plan:
                parts = []
                for c in chunks:
                    if c.target == 0:
                        continue
                    full = c.target == c.end - c.start
                    parts.append(layer.read_span(h, c.start, c.end) if full else fitted[(h, c.start)])
                spans_out.append((start, end, _concat(parts)))
            out.append(spans_out)
        return out


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
    return Block(*(torch.cat([getattr(p, f) for p in parts]) for f in ("keys", "values", "beta", "pos", "tok")))
