"""CompactedCache: a byte-budgeted KV cache whose entries carry a per-key attention bias.

One :class:`~agentmem.layer_store.CacheLayer` per decoder layer holds keys, values, an fp32 beta,
the RoPE position and the token index of every entry, with per-KV-head lengths (padding carries
beta = -inf). ``kv_bytes`` counts every byte of those buffers (capacity and padding included); the
budget bounds it at all times, including the moment a buffer is re-allocated (old and new copies
both count).

Logical length (tokens seen) and physical length (entries stored) are separate. RoPE positions
are never renumbered by compaction; positions.py may rotate keys by an offset (re-basing) or
compress the positions of the far past, always recording the new position in ``pos``.

The narrow API used by policies and compaction: :meth:`CacheLayer.read_span`,
:meth:`CompactedCache.replace_spans` (atomic), :meth:`CompactedCache.fits` / ``reserve``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from .errors import BudgetError, CompactionError
from .layer_store import _ALIGN, _GROWTH, Block, CacheLayer, _round_up
from .models import ModelSpec

# per KV head: the spans to replace, as (start, end, block); block None deletes the span
HeadSpans = Sequence[tuple[int, int, "Block | None"]]


class CompactedCache(Cache):
    """transformers ``Cache`` holding one :class:`CacheLayer` per decoder layer, under a byte budget.

    ``max_bytes`` (None = unbounded) bounds :attr:`kv_bytes` at every moment. The session calls
    :meth:`begin_forward` before each model call (positions of the new tokens) and :meth:`fits` /
    :meth:`reserve` to make room; ``update`` is what the model's attention layers call.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str, max_bytes: int | None):
        device = torch.device(device)
        layers = [
            CacheLayer(spec.num_kv_heads, spec.head_dim, spec.v_head_dim, dtype, device, spec.sliding_window[i])
            for i in range(spec.num_layers)
        ]
        super().__init__(layers=layers)
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self.max_bytes = max_bytes
        self.logical_length = 0  # tokens seen == logical index of the next token
        self.position_offset = 0  # RoPE position of the next token = logical_length - position_offset
        self.peak_bytes = 0
        self._new_pos: torch.Tensor | None = None
        self._new_tok: torch.Tensor | None = None
        self.step_first_pos = 0
        self.query_observer = None  # callable(layer_idx, query): scratch passes collecting queries
        self.query_buffer = None  # compaction.queries.QueryBuffer fed by the attention path, if any

    # ------------------------------------------------------------------ accounting
    @property
    def kv_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def payload_bytes(self) -> int:
        """Bytes of entries in use (keys, values, beta, pos, tok), excluding spare capacity and padding."""
        return sum(layer.payload_entries * layer.slot_bytes() // layer.num_heads for layer in self.layers)

    @property
    def physical_entries(self) -> int:
        return sum(layer.payload_entries for layer in self.layers)

    @property
    def physical_tokens(self) -> float:
        """Entries stored per (layer, KV head), averaged: the cache's physical length in tokens."""
        return self.physical_entries / (len(self.layers) * self.spec.num_kv_heads)

    @property
    def next_position(self) -> int:
        return self.logical_length - self.position_offset

    def bytes_per_token(self) -> int:
        """Bytes one more token costs in every layer (keys, values and metadata of all KV heads)."""
        return sum(layer.slot_bytes() for layer in self.layers)

    def _note_peak(self, extra: int = 0) -> None:
        self.peak_bytes = max(self.peak_bytes, self.kv_bytes + extra)

    # ------------------------------------------------------------------ room
    def _needed_lengths(self, n: int) -> list[int]:
        return [layer.max_length + n for layer in self.layers]

    def _plan_capacities(self, n: int) -> list[int] | None:
        """Capacities that hold n more tokens per head, or None if the budget cannot hold them.

        Tries geometric growth first, then exact sizes. A plan is accepted only if its peak, counting
        the old and the new buffer of the layer being re-allocated, stays within ``max_bytes``.
        """
        need = self._needed_lengths(n)
        caps = [layer.capacity for layer in self.layers]
        if all(c >= m for c, m in zip(caps, need)):
            return caps
        for geometric in (True, False):
            plan = []
            for cap, m in zip(caps, need):
                if cap >= m:
                    plan.append(cap)
                elif geometric:
                    plan.append(_round_up(max(m, int(cap * _GROWTH), _ALIGN)))
                else:
                    plan.append(m)
            if self._plan_peak(plan) <= (self.max_bytes if self.max_bytes is not None else math.inf):
                return plan
        return None

    def _plan_peak(self, plan: list[int]) -> int:
        current = [layer.nbytes for layer in self.layers]
        total = sum(current)
        peak = total
        for i, (layer, cap) in enumerate(zip(self.layers, plan)):
            if cap != layer.capacity:
                new = cap * layer.slot_bytes()
                peak = max(peak, total + new)  # old and new buffers of layer i coexist
                total += new - current[i]
        return max(peak, total)

    def fits(self, n: int) -> bool:
        """Whether n more tokens can be appended to every layer within the budget."""
        return self._plan_capacities(n) is not None

    def reserve(self, n: int) -> None:
        plan = self._plan_capacities(n)
        if plan is None:
            raise BudgetError(
                f"{n} more tokens need {n * self.bytes_per_token() / 2**20:.2f} MiB more KV memory; "
                f"the cache holds {self.kv_bytes / 2**20:.2f} of max {self.max_bytes / 2**20:.2f} MiB"
            )
        for layer, cap in zip(self.layers, plan):
            if cap != layer.capacity:
                self._note_peak(cap * layer.slot_bytes())
                layer.resize(cap)
        self._note_peak()

    def max_tokens(self) -> int:
        """Most tokens per head the budget can ever hold (one layer may be mid re-allocation)."""
        if self.max_bytes is None:
            return 1 << 30
        per_tok = self.bytes_per_token()
        biggest = max(layer.slot_bytes() for layer in self.layers)
        return max(0, int(self.max_bytes // (per_tok + biggest)))

    def bytes_for_tokens(self, n: int) -> int:
        """The smallest budget for which :meth:`max_tokens` is at least n."""
        per_tok = self.bytes_per_token()
        biggest = max(layer.slot_bytes() for layer in self.layers)
        return n * (per_tok + biggest)

    def free_tokens(self) -> int:
        """How many tokens can be appended to every layer right now without compacting."""
        lo, hi = 0, self.max_tokens() + 1
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if self.fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def shrink_to_fit(self, spare: int = 0) -> None:
        """Release capacity beyond each layer's length + ``spare`` (when the budget allows the copy)."""
        for layer in self.layers:
            cap = _round_up(layer.max_length + spare)
            if cap < layer.capacity:
                extra = cap * layer.slot_bytes()
                if self.max_bytes is None or self.kv_bytes + extra <= self.max_bytes:
                    self._note_peak(extra)
                    layer.resize(cap)

    # ------------------------------------------------------------------ forward protocol
    def begin_forward(self, n: int) -> torch.Tensor:
        """Prepare n new tokens; returns their RoPE position ids (1, n) for the model call."""
        p0 = self.next_position
        self.step_first_pos = p0
        self._new_pos = torch.arange(p0, p0 + n, dtype=torch.int32, device=self.device)
        self._new_tok = torch.arange(
            self.logical_length, self.logical_length + n, dtype=torch.int32, device=self.device
        )
        for layer in self.layers:
            layer.step_new = 0
        return self._new_pos.to(torch.long)[None, :]

    def commit_forward(self, n: int) -> None:
        self.logical_length += n
        self._new_pos = self._new_tok = None
        self._note_peak()

    def snapshot_lengths(self) -> list[list[int]]:
        return [list(layer.lengths) for layer in self.layers]

    def rollback(self, lengths: list[list[int]]) -> None:
        """Undo appends made since ``snapshot_lengths`` (a failed or scratch forward)."""
        for layer, lens in zip(self.layers, lengths):
            layer.truncate_to(lens)
            layer.step_new = 0
            layer.refresh_meta()
        self._new_pos = self._new_tok = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._new_pos is None or self._new_pos.numel() != key_states.shape[2]:
            raise RuntimeError(
                "CompactedCache.update called outside a session forward: call begin_forward(n) first "
                "(AgentSession does this; pass position_ids it returns to the model)"
            )
        if key_states.shape[0] != 1:
            raise ValueError("CompactedCache holds one sequence (batch size 1)")
        layer = self.layers[layer_idx]
        layer.append(key_states, value_states, self._new_pos, self._new_tok)
        lmax = layer.max_length
        return layer.keys[:, :, :lmax], layer.values[:, :, :lmax]

    # transformers' Cache API (used by model code and masking utilities)
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.next_position

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # agentmem attention builds its own mask from the cache; keep transformers' one trivially small.
        return query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    # ------------------------------------------------------------------ compaction API
    def validate_spans(self, staged: Sequence[tuple[int, Sequence[HeadSpans]]]) -> None:
        """Check replacements for several layers before any is written (see :meth:`replace_spans`)."""
        for layer_idx, per_head in staged:
            self._validate(layer_idx, per_head)

    def _validate(self, layer_idx: int, per_head: Sequence[HeadSpans]) -> None:
        layer = self.layers[layer_idx]
        if len(per_head) != layer.num_heads:
            raise CompactionError(f"need the spans of every KV head ({layer.num_heads}), got {len(per_head)}")
        for h, spans in enumerate(per_head):
            prev_end = 0
            for start, end, block in sorted(spans, key=lambda x: x[0]):
                if not prev_end <= start <= end <= layer.lengths[h]:
                    raise CompactionError(
                        f"layer {layer_idx} head {h}: span [{start}, {end}) outside [0, {layer.lengths[h]}) "
                        "or overlapping another span"
                    )
                prev_end = end
                if block is None:
                    continue
                t = len(block)
                if block.keys.shape != (t, layer.head_dim) or block.values.shape != (t, layer.v_head_dim):
                    shapes = f"{tuple(block.keys.shape)}/{tuple(block.values.shape)}"
                    raise CompactionError(f"layer {layer_idx} head {h}: block shapes {shapes}")
                if block.beta.shape != (t,) or block.pos.shape != (t,) or block.tok.shape != (t,):
                    raise CompactionError(f"layer {layer_idx} head {h}: beta/pos/tok must have shape ({t},)")
                if t > end - start:
                    raise CompactionError(
                        f"layer {layer_idx} head {h}: block of {t} entries replaces only {end - start}"
                    )
                for name in ("keys", "values", "beta"):
                    if not torch.isfinite(getattr(block, name)).all():
                        raise CompactionError(f"layer {layer_idx} head {h}: non-finite {name} in compacted block")

    def replace_spans(self, layer_idx: int, per_head: Sequence[HeadSpans]) -> None:
        """Atomically replace spans of every KV head of one layer by blocks (None = delete).

        ``per_head[h]`` lists head h's non-overlapping ``(start, end, block)``, in slot indices of
        the current state. Every block is validated (shapes, finite keys, values and beta, no longer
        than its span) before anything is written; a bad block raises :class:`CompactionError` and
        leaves the layer untouched.
        """
        self._validate(layer_idx, per_head)
        layer = self.layers[layer_idx]
        for h, spans in enumerate(per_head):
            for start, end, block in sorted(spans, key=lambda x: -x[0]):  # last first: indices stay valid
                if block is None and start == end:
                    continue
                layer._write_head(h, start, end, block)
        layer.refresh_meta()

    def evict_all_heads(self, layer_idx: int, start: int, end: int) -> None:
        """Delete slots [start, end) of every head of an even layer (one vectorised move)."""
        layer = self.layers[layer_idx]
        if not layer.even:
            self.replace_spans(layer_idx, [[(start, end, None)]] * layer.num_heads)
            return
        length = layer.lengths[0]
        if not 0 <= start <= end <= length:
            raise CompactionError(f"layer {layer_idx}: span [{start}, {end}) outside [0, {length})")
        k = end - start
        if k == 0:
            return
        tail = slice(end, length)
        dst = slice(start, length - k)
        for buf in (layer.keys, layer.values):
            buf[:, :, dst] = buf[:, :, tail].clone()
        for buf in (layer.beta, layer.pos, layer.tok):
            buf[:, dst] = buf[:, tail].clone()
        for h in range(layer.num_heads):
            layer._clear(h, length - k, length)
        layer.lengths = [length - k] * layer.num_heads
        layer.refresh_meta()

    def trim_sliding(self, n: int, min_dead: int = 64) -> int:
        """Drop entries of sliding-window layers that no query from now on can see.

        Before appending n tokens starting at position p, a key at q <= p - window is outside every
        future window. They are masked anyway; deleting them is batched (``min_dead`` at a time,
        0 = now) because it moves the whole layer. Returns the number of entries dropped.
        """
        first = self.next_position
        dropped = 0
        for idx, layer in enumerate(self.layers):
            w = layer.sliding_window
            if w is None or layer.min_pos is None or first - layer.min_pos < w:
                continue
            lmax = layer.max_length
            dead = (layer.valid_mask() & (layer.pos[:, :lmax].to(torch.long) <= first - w)).sum(dim=1).tolist()
            if max(dead) < max(1, min_dead):
                continue
            if len(set(dead)) == 1 and layer.even:  # entries are position-ordered: the dead ones are a prefix
                self.evict_all_heads(idx, 0, dead[0])
            else:
                self.replace_spans(idx, [[(0, d, None)] for d in dead])
            dropped += sum(dead)
        return dropped

    def clone(self) -> CompactedCache:
        """Independent copy (same budget) for scratch work such as scoring text that does not fit."""
        other = CompactedCache(self.spec, self.dtype, self.device, self.max_bytes)
        for src, dst in zip(self.layers, other.layers):
            dst.keys, dst.values = src.keys.clone(), src.values.clone()
            dst.beta, dst.pos, dst.tok = src.beta.clone(), src.pos.clone(), src.tok.clone()
            dst.lengths = list(src.lengths)
            dst.has_bias, dst.min_pos = src.has_bias, src.min_pos
        other.logical_length = self.logical_length
        other.position_offset = self.position_offset
        other.peak_bytes = self.peak_bytes
        return other

    def describe(self) -> dict:
        return {
            "kv_bytes": self.kv_bytes,
            "payload_bytes": self.payload_bytes,
            "max_bytes": self.max_bytes,
            "logical_tokens": self.logical_length,
            "physical_tokens": self.physical_tokens,
            "next_position": self.next_position,
            "layers": [
                {
                    "lengths": list(layer.lengths),
                    "capacity": layer.capacity,
                    "has_bias": layer.has_bias,
                    "sliding_window": layer.sliding_window,
                }
                for layer in self.layers
            ],
        }
