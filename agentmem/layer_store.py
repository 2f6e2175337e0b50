"""Per-layer storage of a compacted KV cache: one layer's keys, values, beta, positions and token ids.

For a batch of one sequence, a layer holds::

    keys    (1, H_kv, cap, d)     model dtype, post-RoPE
    values  (1, H_kv, cap, d_v)   model dtype
    beta    (H_kv, cap)           fp32 additive bias on the attention logit of each key
    pos     (H_kv, cap)           int32 RoPE position currently baked into each key
    tok     (H_kv, cap)           int32 logical index of the token each key came from

Each KV head has its own length ``lengths[h] <= cap``; slots past it are padding (keys/values
zero, beta = -inf) and never receive attention. Within a head, entries are in position order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import CompactionError

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
    """One decoder layer's storage. Not a transformers ``CacheLayerMixin``: CompactedCache dispatches."""

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

    def snapshot(self) -> tuple:
        """A copy of everything this layer holds (for undoing a multi-step edit)."""
        return (
            self.keys.clone(),
            self.values.clone(),
            self.beta.clone(),
            self.pos.clone(),
            self.tok.clone(),
            list(self.lengths),
        )

    def restore(self, state: tuple) -> None:
        self.keys, self.values, self.beta, self.pos, self.tok, lengths = state
        self.lengths = list(lengths)
        self.refresh_meta()

    # ------------------------------------------------------------------ reads
    def head(self, name: str, h: int) -> torch.Tensor:
        """Head h's slots of buffer ``name`` ("k", "v", "beta", "pos", "tok"): a view, first dim = slots."""
        if name in ("k", "v"):
            return (self.keys if name == "k" else self.values)[0, h]
        return getattr(self, name)[h]

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
