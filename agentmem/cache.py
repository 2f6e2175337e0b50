"""CompactedCache: a byte-budgeted KV cache whose entries carry a per-key attention bias.

Per layer the cache holds, for a batch of one sequence::

    keys    (1, H_kv, cap, d)     model dtype, post-RoPE
    values  (1, H_kv, cap, d_v)   model dtype
    beta    (H_kv, cap)           fp32 additive bias on the attention logit of each key
    pos     (H_kv, cap)           int32 RoPE position currently baked into each key
    tok     (H_kv, cap)           int32 logical index of the token each key came from

Each KV head has its own physical length ``lengths[h] <= cap``. Slots past a head's length are
padding: keys/values zero and beta = -inf, so they never receive attention. ``kv_bytes`` counts
every byte of those buffers (capacity and padding included); the budget bounds it at all times,
including the moment a buffer is re-allocated (old and new copies both count).

Logical length (tokens seen) and physical length (entries stored) are separate. RoPE positions
are never renumbered by compaction; positions.py may rotate keys by an offset (re-basing) or
compress the positions of the far past, always recording the new position in ``pos``.

The narrow API used by policies and compaction: :meth:`CacheLayer.read_span`,
:meth:`CompactedCache.replace_spans` (atomic), :meth:`CompactedCache.fits`/``reserve``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .errors import BudgetError, CompactionError
from .models import ModelSpec

META_BYTES_PER_SLOT = 4 + 4 + 4  # beta fp32 + pos int32 + tok int32, per (head, slot)
_GROWTH = 1.5
_ALIGN = 16  # capacities are multiples of this many slots


def _round_up(n: int, k: int = _ALIGN) -> int:
    return ((n + k - 1) // k) * k


@dataclass
class Block:
    """A run of entries for one KV head, as stored: keys (t, d), values (t, d_v), beta/pos/tok (t,)."""

    keys: torch.Tensor
    values: torch.Tensor
    beta: torch.Tensor
    pos: torch.Tensor
    tok: torch.Tensor

    def __len__(self) -> int:
        return int(self.keys.shape[0])


class CacheLayer:
    """One decoder layer's storage. Not a transformers ``CacheLayerMixin``: the parent cache dispatches."""

    is_sliding: bool
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        v_head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        sliding_window: int | None,
    ):
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim
        self.dtype = dtype
        self.device = device
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.is_initialized = True
        self.lengths: list[int] = [0] * num_heads
        self.has_bias = False  # any beta != 0 or uneven head lengths (padding holds -inf)
        self.min_pos: int | None = None  # smallest stored position (python int, refreshed on structural edits)
        # set by CompactedCache.begin_forward / update for the attention path
        self.step_new = 0
        self.step_lengths_before: list[int] = [0] * num_heads
        self._alloc(0)

    # ------------------------------------------------------------------ storage
    def slot_bytes(self) -> int:
        item = torch.finfo(self.dtype).bits // 8
        return self.num_heads * ((self.head_dim + self.v_head_dim) * item + META_BYTES_PER_SLOT)

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.capacity * self.slot_bytes()

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def payload_entries(self) -> int:
        return sum(self.lengths)

    @property
    def even(self) -> bool:
        return min(self.lengths) == max(self.lengths)

    def _alloc(self, cap: int) -> None:
        h, dev = self.num_heads, self.device
        self.keys = torch.zeros(1, h, cap, self.head_dim, dtype=self.dtype, device=dev)
        self.values = torch.zeros(1, h, cap, self.v_head_dim, dtype=self.dtype, device=dev)
        self.beta = torch.full((h, cap), -math.inf, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(h, cap, dtype=torch.int32, device=dev)
        self.tok = torch.zeros(h, cap, dtype=torch.int32, device=dev)

    def resize(self, cap: int) -> None:
        """Re-allocate to ``cap`` slots (>= every head's length), keeping the content."""
        if cap < self.max_length:
            raise ValueError(f"capacity {cap} < stored length {self.max_length}")
        if cap == self.capacity:
            return
        old = (self.keys, self.values, self.beta, self.pos, self.tok)
        self._alloc(cap)
        n = min(cap, old[0].shape[2])
        self.keys[:, :, :n] = old[0][:, :, :n]
        self.values[:, :, :n] = old[1][:, :, :n]
        self.beta[:, :n] = old[2][:, :n]
        self.pos[:, :n] = old[3][:, :n]
        self.tok[:, :n] = old[4][:, :n]

    def refresh_meta(self) -> None:
        """Recompute flags after a structural edit (compaction, eviction, rotation)."""
        lmax = self.max_length
        if lmax == 0:
            self.min_pos, self.has_bias = None, False
            return
        valid = (
            torch.arange(lmax, device=self.device)[None, :] < torch.tensor(self.lengths, device=self.device)[:, None]
        )
        pos = self.pos[:, :lmax]
        self.min_pos = int(torch.where(valid, pos, torch.iinfo(torch.int32).max).min().item())
        beta = self.beta[:, :lmax]
        nonzero = bool(((beta != 0) & valid).any().item())
        self.has_bias = nonzero or not self.even

    # ------------------------------------------------------------------ appends
    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> None:
        """Append n new entries to every head. k: (1, H, n, d); pos/tok: (n,) int32."""
        n = k.shape[2]
        need = self.max_length + n
        if need > self.capacity:  # only when a caller skipped CompactedCache.reserve
            self.resize(_round_up(need))
        self.step_lengths_before = list(self.lengths)
        self.step_new = n
        if self.even:
            a = self.lengths[0]
            self.keys[:, :, a : a + n] = k
            self.values[:, :, a : a + n] = v
            self.beta[:, a : a + n] = 0.0
            self.pos[:, a : a + n] = pos
            self.tok[:, a : a + n] = tok
        else:
            for h, a in enumerate(self.lengths):
                self.keys[0, h, a : a + n] = k[0, h]
                self.values[0, h, a : a + n] = v[0, h]
                self.beta[h, a : a + n] = 0.0
                self.pos[h, a : a + n] = pos
                self.tok[h, a : a + n] = tok
        self.lengths = [a + n for a in self.lengths]
        if self.min_pos is None:
            self.min_pos = int(pos[0].item()) if pos.device.type == "cpu" else None
            if self.min_pos is None:
                self.refresh_meta()

    def truncate_to(self, lengths: Sequence[int]) -> None:
        """Drop entries appended after ``lengths`` (used to roll back a failed or scratch forward)."""
        for h, (cur, keep) in enumerate(zip(self.lengths, lengths)):
            if keep < cur:
                self._clear(h, keep, cur)
        self.lengths = list(lengths)

    def _clear(self, h: int, a: int, b: int) -> None:
        self.keys[0, h, a:b] = 0
        self.values[0, h, a:b] = 0
        self.beta[h, a:b] = -math.inf
        self.pos[h, a:b] = 0
        self.tok[h, a:b] = 0

    # ------------------------------------------------------------------ reads
    def read_span(self, head: int, start: int, end: int) -> Block:
        """Copy of slots [start, end) of one head."""
        return Block(
            keys=self.keys[0, head, start:end].clone(),
            values=self.values[0, head, start:end].clone(),
            beta=self.beta[head, start:end].clone(),
            pos=self.pos[head, start:end].clone(),
            tok=self.tok[head, start:end].clone(),
        )

    def valid_mask(self) -> torch.Tensor:
        """(H, max_length) bool: which slots hold entries."""
        lmax = self.max_length
        return torch.arange(lmax, device=self.device)[None, :] < torch.tensor(self.lengths, device=self.device)[:, None]

    # ------------------------------------------------------------------ edits
    def _write_head(self, h: int, start: int, end: int, block: Block | None) -> None:
        """Replace slots [start, end) of head h by ``block`` (None = delete), shifting the tail."""
        length = self.lengths[h]
        t = 0 if block is None else len(block)
        tail = length - end
        new_len = start + t + tail
        if new_len > self.capacity:
            raise CompactionError(f"replacement grows head {h} beyond capacity {self.capacity}")
        if tail > 0 and t != end - start:
            sl_src, sl_dst = slice(end, length), slice(start + t, start + t + tail)
            for buf in (self.keys, self.values):
                buf[0, h, sl_dst] = buf[0, h, sl_src].clone()
            for buf in (self.beta, self.pos, self.tok):
                buf[h, sl_dst] = buf[h, sl_src].clone()
        if t:
            self.keys[0, h, start : start + t] = block.keys.to(self.dtype)
            self.values[0, h, start : start + t] = block.values.to(self.dtype)
            self.beta[h, start : start + t] = block.beta.to(torch.float32)
            self.pos[h, start : start + t] = block.pos.to(torch.int32)
            self.tok[h, start : start + t] = block.tok.to(torch.int32)
        if new_len < length:
            self._clear(h, new_len, length)
        self.lengths[h] = new_len

    def rotate(self, delta_pos: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Rotate stored keys by per-slot position deltas (H, max_length) and record the new positions.

        RoPE with the HF "rotate_half" layout: a key at position p is k0 * cos(p w) + rot(k0) * sin(p w),
        so moving it to p + delta is the same operation with angle delta * w. Done in fp32.
        """
        lmax = self.max_length
        if lmax == 0:
            return
        rot_dim = 2 * inv_freq.numel()
        ang = delta_pos.to(torch.float64)[..., None] * inv_freq.to(self.device, torch.float64)  # (H, L, rot/2)
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos().float(), emb.sin().float()
        k = self.keys[0, :, :lmax, :rot_dim].float()  # (H, L, rot)
        half = rot_dim // 2
        k_rot = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        self.keys[0, :, :lmax, :rot_dim] = (k * cos + k_rot * sin).to(self.dtype)
        valid = self.valid_mask()
        self.pos[:, :lmax] = torch.where(valid, self.pos[:, :lmax] + delta_pos.to(torch.int32), self.pos[:, :lmax])


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
        self.query_observer = None  # optional callable(layer_idx, query) used by compaction (recent queries)

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
    def validate_spans(self, staged: Sequence[tuple[int, Sequence[tuple[int, int, Block | None]]]]) -> None:
        """Check replacements for several layers before any is written (see :meth:`replace_spans`)."""
        for layer_idx, spans in staged:
            self._validate(layer_idx, spans)

    def _validate(self, layer_idx: int, spans: Sequence[tuple[int, int, Block | None]]) -> None:
        layer = self.layers[layer_idx]
        if len(spans) != layer.num_heads:
            raise CompactionError(f"need one span per KV head ({layer.num_heads}), got {len(spans)}")
        for h, (start, end, block) in enumerate(spans):
            if not 0 <= start <= end <= layer.lengths[h]:
                raise CompactionError(
                    f"layer {layer_idx} head {h}: span [{start}, {end}) outside [0, {layer.lengths[h]})"
                )
            if block is None:
                continue
            t = len(block)
            if block.keys.shape != (t, layer.head_dim) or block.values.shape != (t, layer.v_head_dim):
                raise CompactionError(
                    f"layer {layer_idx} head {h}: block shapes {tuple(block.keys.shape)}/{tuple(block.values.shape)}"
                )
            if block.beta.shape != (t,) or block.pos.shape != (t,) or block.tok.shape != (t,):
                raise CompactionError(f"layer {layer_idx} head {h}: beta/pos/tok must have shape ({t},)")
            if t > end - start:
                raise CompactionError(f"layer {layer_idx} head {h}: block of {t} entries replaces only {end - start}")
            for name in ("keys", "values", "beta"):
                if not torch.isfinite(getattr(block, name)).all():
                    raise CompactionError(f"layer {layer_idx} head {h}: non-finite {name} in compacted block")

    def replace_spans(self, layer_idx: int, spans: Sequence[tuple[int, int, Block | None]]) -> None:
        """Atomically replace, for each head h, slots [start_h, end_h) by a block (None = delete).

        ``spans`` has one ``(start, end, block)`` per KV head. Every block is validated (shapes,
        finite keys, values and beta, no longer than its span) before anything is written; a bad
        block raises :class:`CompactionError` and leaves the layer untouched.
        """
        self._validate(layer_idx, spans)
        layer = self.layers[layer_idx]
        for h, (start, end, block) in enumerate(spans):
            if block is None and start == end:
                continue
            layer._write_head(h, start, end, block)
        layer.refresh_meta()

    def evict_all_heads(self, layer_idx: int, start: int, end: int) -> None:
        """Delete slots [start, end) of every head of an even layer (one vectorised move)."""
        layer = self.layers[layer_idx]
        if not layer.even:
            self.replace_spans(layer_idx, [(start, end, None)] * layer.num_heads)
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
                self.replace_spans(idx, [(0, d, None) for d in dead])
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
