"""Per-layer storage of a compacted KV cache: one layer's keys, values, beta, positions and token ids.

Every KV head h owns a contiguous run of ``caps[h]`` slots in flat per-layer buffers::

    k     (N, d)     model dtype, post-RoPE        N = sum(caps), the layer's slots
    v     (N, d_v)   model dtype
    beta  (N,)       fp32 additive bias on the attention logit of each key
    pos   (N,)       int32 RoPE position currently baked into each key
    tok   (N,)       int32 logical index of the token each key came from

Head h's slots are ``[offs[h], offs[h] + caps[h])``; the first ``lengths[h]`` hold entries, in
position order, the rest are padding (zero keys/values, beta = -inf, pos = tok = 0).

When every head has the same capacity (``uniform``: the normal case before any non-uniform
compaction) the buffers are exactly the classic (H, cap, d) layout: :meth:`CacheLayer.kv4d` and
:meth:`CacheLayer.grid` are free views and attention is one call per layer. After a non-uniform
compaction :meth:`CacheLayer.resize` gives each head only the capacity it needs, so memory follows
the payload instead of the longest head; attention then reads each head's run directly
(``attention.py``). Read through the accessors (:meth:`~CacheLayer.head`, :meth:`~CacheLayer.grid`,
:meth:`~CacheLayer.gather`, :meth:`~CacheLayer.read_span`), which work in both layouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import CompactionError
from .rope import rotated

META_BYTES_PER_SLOT = 4 + 4 + 4  # beta fp32 + pos int32 + tok int32, per (head, slot)
GROWTH = 1.5
ALIGN = 16  # capacities are rounded up to multiples of this many slots (except exact fits)
FIELDS = ("k", "v", "beta", "pos", "tok")
_FILL = {"k": 0.0, "v": 0.0, "beta": -math.inf, "pos": 0, "tok": 0}


def round_up(n: int, k: int = ALIGN) -> int:
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

    @property
    def fields(self) -> tuple[torch.Tensor, ...]:
        """The tensors in the order of the layer's buffers (:data:`FIELDS`)."""
        return self.keys, self.values, self.beta, self.pos, self.tok

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields)


# per KV head: the spans to replace, as (start, end, block); block None deletes the span
HeadSpans = Sequence[tuple[int, int, Block | None]]


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
        self.has_beta = False  # some entry has beta != 0
        self.has_bias = False  # has_beta or uneven head lengths (padding holds -inf)
        self.min_pos: int | None = None  # smallest stored position (python int, refreshed on structural edits)
        # set by CompactedCache.begin_forward / update for the attention path
        self.step_lengths_before: list[int] = [0] * num_heads
        item = torch.finfo(dtype).bits // 8
        self._head_slot_bytes = (head_dim + v_head_dim) * item + META_BYTES_PER_SLOT
        self._alloc([0] * num_heads)

    # ------------------------------------------------------------------ layout
    def head_slot_bytes(self) -> int:
        """Bytes of one slot of one head: key, value, beta, position and token index."""
        return self._head_slot_bytes

    def slot_bytes(self) -> int:
        """Bytes one more token costs this layer (a slot in every head)."""
        return self.num_heads * self._head_slot_bytes

    @property
    def caps(self) -> list[int]:
        """Per-head capacities (slots), a copy."""
        return list(self._caps)

    @property
    def offs(self) -> list[int]:
        """Per-head first slot in the flat buffers, a copy."""
        return list(self._offs)

    @property
    def capacity(self) -> int:
        """The largest head capacity."""
        return max(self._caps)

    @property
    def uniform(self) -> bool:
        """Every head has the same capacity: the buffers are an (H, cap, ...) grid."""
        return self._uniform

    @property
    def nbytes(self) -> int:
        return int(self.k.shape[0]) * self._head_slot_bytes

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def payload_entries(self) -> int:
        return sum(self.lengths)

    @property
    def used_slots(self) -> int:
        """Flat slots up to the last head's last entry: every slot beyond is padding."""
        return self._offs[-1] + self.lengths[-1]

    @property
    def even(self) -> bool:
        return min(self.lengths) == max(self.lengths)

    def _set_layout(self, caps: Sequence[int]) -> None:
        self._caps = [int(c) for c in caps]
        self._offs = [0] * len(self._caps)
        for h in range(1, len(self._caps)):
            self._offs[h] = self._offs[h - 1] + self._caps[h - 1]
        self._uniform = min(self._caps) == max(self._caps)
        self._offs_t: torch.Tensor | None = None  # device copy of offs, built on demand (gather)
        self._next_slots: tuple[tuple[int, ...], torch.Tensor] | None = None  # (lengths, offs + lengths) for append
        self._owner: torch.Tensor | None = None  # owner_bias(), built on demand

    def _alloc(self, caps: Sequence[int]) -> None:
        self._set_layout(caps)
        n, dev = sum(self._caps), self.device
        self.k = torch.zeros(n, self.head_dim, dtype=self.dtype, device=dev)
        self.v = torch.zeros(n, self.v_head_dim, dtype=self.dtype, device=dev)
        self.beta = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(n, dtype=torch.int32, device=dev)
        self.tok = torch.zeros(n, dtype=torch.int32, device=dev)
        self._bind_views()

    def _bind_views(self) -> None:
        """Cache the views the per-step hot path reads: the (H, cap, ...) grids of a uniform layer, or
        each head's (k, v, beta) run of a non-uniform one."""
        self._grids = self._k4 = self._v4 = None  # views hold their buffer: none may outlive a re-allocation
        self._runs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if self._uniform:
            h, cap = self.num_heads, self._caps[0]
            self._grids = {name: getattr(self, name).view(h, cap, *getattr(self, name).shape[1:]) for name in FIELDS}
            self._k4, self._v4 = self._grids["k"][None], self._grids["v"][None]  # (1, H, cap, d)
        else:
            self._runs = [tuple(self.head(name, h) for name in ("k", "v", "beta")) for h in range(self.num_heads)]

    def _grid_view(self, name: str) -> torch.Tensor:
        """(H, cap, ...) view of a flat buffer; only for a uniform layer."""
        return self._grids[name]

    def resize(self, caps: int | Sequence[int]) -> None:
        """Re-allocate to per-head capacities (an int: the same for every head), keeping the content."""
        caps = [int(caps)] * self.num_heads if isinstance(caps, int) else [int(c) for c in caps]
        if len(caps) != self.num_heads or any(c < n for c, n in zip(caps, self.lengths)):
            raise ValueError(f"capacities {caps} below stored lengths {self.lengths}")
        if caps == self._caps:
            return
        was_uniform, old_cap = self._uniform, self._caps[0]
        old = {name: getattr(self, name) for name in FIELDS}
        old_offs = self._offs
        self._alloc(caps)
        if was_uniform and self._uniform:  # grid to grid: one copy per buffer (padding carries its fill)
            m = min(old_cap, self._caps[0])
            for name in FIELDS:
                self._grid_view(name)[:, :m] = old[name].view(self.num_heads, old_cap, *old[name].shape[1:])[:, :m]
            return
        for h, n in enumerate(self.lengths):
            if n:
                a, b = old_offs[h], self._offs[h]
                for name in FIELDS:
                    getattr(self, name)[b : b + n] = old[name][a : a + n]

    # ------------------------------------------------------------------ reads
    def head(self, name: str, h: int) -> torch.Tensor:
        """Head h's slots of buffer ``name`` ("k", "v", "beta", "pos", "tok"): a view (caps[h], ...)."""
        a = self._offs[h]
        return getattr(self, name)[a : a + self._caps[h]]

    def run(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head h's keys (cap, d), values (cap, d_v) and beta (cap,): views; non-uniform layers only."""
        return self._runs[h]

    def owner_bias(self) -> torch.Tensor:
        """(H, 1, N) bf16: 0 on head h's own slots, -inf on every other head's. Added to the flat
        fp32 ``beta`` (-inf on padding), it hides from head h's queries every slot that is not one of
        its entries. Built once per layout, outside ``kv_bytes``: 2 bytes per head for each of the N
        slots (1.1% of a SmolLM2 fp32 layer's KV; 18 KiB for 3 heads of 1,024 slots). In decoding,
        per layer call at 256 / 1k tokens: fp32 0.68 / 0.77x the per-head path, bf16 0.73 / 0.80x,
        a bool mask through ``torch.where`` (half the bytes again) 0.80 / 0.84x."""
        if self._owner is None:
            shape = (self.num_heads, 1, int(self.k.shape[0]))
            own = torch.full(shape, -math.inf, dtype=torch.bfloat16, device=self.device)
            for h, (a, c) in enumerate(zip(self._offs, self._caps)):
                own[h, :, a : a + c] = 0.0
            self._owner = own
        return self._owner

    def kv4d(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, H, length, d) and (1, H, length, d_v) views of keys and values; uniform layers only."""
        if not self._uniform:
            raise RuntimeError("kv4d needs a uniform layer (equal head capacities)")
        return self._k4[:, :, :length], self._v4[:, :, :length]

    def grid(self, name: str, length: int) -> torch.Tensor:
        """(H, length) of beta / pos / tok (or (H, length, d) of k / v).

        A view when the layer is uniform (writes go through); otherwise a padded copy (for rare
        structural edits, never per decode step). ``length`` must not exceed :attr:`capacity`.
        """
        if self._uniform:
            return self._grid_view(name)[:, :length]
        buf = getattr(self, name)
        out = torch.full((self.num_heads, length, *buf.shape[1:]), _FILL[name], dtype=buf.dtype, device=buf.device)
        for h in range(self.num_heads):
            n = min(length, self._caps[h])
            out[h, :n] = self.head(name, h)[:n]
        return out

    def gather(self, name: str, heads: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Entries of several heads at once: heads (B,) long, slots (B, T) long -> (B, T, ...) copy."""
        if self._offs_t is None:
            self._offs_t = torch.tensor(self._offs, dtype=torch.long, device=self.device)
        flat = self._offs_t.to(heads.device)[heads][:, None] + slots
        return getattr(self, name)[flat]

    def valid_mask(self) -> torch.Tensor:
        """(H, max_length) bool: which slots hold entries."""
        lmax = self.max_length
        return torch.arange(lmax, device=self.device)[None, :] < torch.tensor(self.lengths, device=self.device)[:, None]

    def read_span(self, h: int, start: int, end: int) -> Block:
        """Copy of slots [start, end) of one head."""
        return Block(*(self.head(name, h)[start:end].clone() for name in FIELDS))

    def refresh_meta(self) -> None:
        """Recompute min_pos and the bias flags after a structural edit (compaction, eviction, rotation)."""
        lmax = self.max_length
        if lmax == 0:
            self.min_pos, self.has_beta, self.has_bias = None, False, False
            return
        valid = self.valid_mask()
        pos = self.grid("pos", lmax)
        self.min_pos = int(torch.where(valid, pos, torch.iinfo(torch.int32).max).min().item())
        self.has_beta = bool(((self.grid("beta", lmax) != 0) & valid).any().item())
        self.has_bias = self.has_beta or not self.even

    # ------------------------------------------------------------------ appends
    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, tok: torch.Tensor) -> None:
        """Append n new entries to every head. k: (1, H, n, d); v: (1, H, n, d_v); pos/tok: (n,) int32."""
        n = k.shape[2]
        if any(a + n > c for a, c in zip(self.lengths, self._caps)):  # only when a caller skipped reserve
            self.resize([max(c, round_up(a + n)) for c, a in zip(self._caps, self.lengths)])
        self.step_lengths_before = list(self.lengths)
        if self._uniform and self.even:
            a, g = self.lengths[0], self._grids
            self._k4[:, :, a : a + n] = k
            self._v4[:, :, a : a + n] = v
            g["beta"][:, a : a + n] = 0.0
            g["pos"][:, a : a + n] = pos
            g["tok"][:, a : a + n] = tok
        else:  # one indexed write per buffer: slots offs[h] + lengths[h] + i, head-major
            h, lengths = self.num_heads, tuple(self.lengths)
            if self._next_slots is not None and self._next_slots[0] == lengths:  # the step after an append
                first = self._next_slots[1]
            else:
                first = torch.tensor([o + a for o, a in zip(self._offs, lengths)], device=self.device)
            idx = first if n == 1 else (first[:, None] + torch.arange(n, device=self.device)[None, :]).reshape(-1)
            self.k.index_copy_(0, idx, k[0].reshape(h * n, -1).to(self.dtype))  # (H * n,) slots, head-major
            self.v.index_copy_(0, idx, v[0].reshape(h * n, -1).to(self.dtype))
            self.beta.index_fill_(0, idx, 0.0)
            self.pos.index_copy_(0, idx, pos.to(torch.int32).expand(h, n).reshape(-1))
            self.tok.index_copy_(0, idx, tok.to(torch.int32).expand(h, n).reshape(-1))
            self._next_slots = (tuple(a + n for a in lengths), first + n)
        self.lengths = [a + n for a in self.lengths]
        if self.min_pos is None:
            self.min_pos = int(pos[0].item()) if pos.device.type == "cpu" else None
            if self.min_pos is None:
                self.refresh_meta()

    def truncate_to(self, lengths: Sequence[int]) -> None:
        """Drop entries appended after ``lengths`` (used to roll back a failed or scratch forward)."""
        if any(keep > cur for cur, keep in zip(self.lengths, lengths)):
            raise ValueError(f"cannot truncate lengths {self.lengths} up to {list(lengths)}")
        for h, (cur, keep) in enumerate(zip(self.lengths, lengths)):
            if keep < cur:
                self._clear(h, keep, cur)
        self.lengths = list(lengths)

    def _clear(self, h: int, a: int, b: int) -> None:
        for name in FIELDS:
            self.head(name, h)[a:b] = _FILL[name]

    def snapshot(self, device: torch.device | None = None, copy: bool = True) -> tuple:
        """A copy of everything this layer holds: (k, v, beta, pos, tok, caps, lengths), on ``device``
        (default: the layer's own; a CUDA cache keeps its undo copies in host memory). ``copy=False``
        on the layer's own device: the buffers themselves, for a caller that is about to replace them."""
        device = device or self.device
        bufs = (getattr(self, name).to(device, copy=copy) for name in FIELDS)
        return (*bufs, list(self._caps), list(self.lengths))

    def restore(self, state: tuple) -> None:
        """Put back a :meth:`snapshot` (the state's tensors are adopted, not copied, when on this device)."""
        *bufs, caps, lengths = state
        for name, buf in zip(FIELDS, bufs):
            setattr(self, name, buf.to(self.device))
        self._set_layout(caps)
        self._bind_views()
        self.lengths = list(lengths)
        self.refresh_meta()

    # ------------------------------------------------------------------ serialisation
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What this layer holds, packed for a file: ``(tensors, meta)`` (mlx-lm's state / meta_state).

        tensors: ``k`` (P, d) and ``v`` (P, d_v) in the layer dtype, ``beta`` (P,) fp32, ``pos`` and
        ``tok`` (P,) int32, on the CPU, where P = sum(lengths): head h's entries are rows
        ``[sum(lengths[:h]), sum(lengths[:h+1]))``, in slot order. Padding is not stored (it is the
        fill value). meta: ``{"lengths": [...], "caps": [...]}`` per KV head.
        """
        rows = [torch.arange(o, o + n) for o, n in zip(self._offs, self.lengths)]
        idx = torch.cat(rows).to(self.device) if rows else torch.zeros(0, dtype=torch.long, device=self.device)
        tensors = {name: getattr(self, name)[idx].cpu() for name in FIELDS}
        return tensors, {"lengths": list(self.lengths), "caps": list(self._caps)}

    def check_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Raise ValueError unless ``(tensors, meta)`` from :meth:`state` fits this layer's shape."""
        lengths, caps = meta.get("lengths"), meta.get("caps")
        for key, val in (("lengths", lengths), ("caps", caps)):
            if not isinstance(val, list) or len(val) != self.num_heads or not all(isinstance(x, int) for x in val):
                raise ValueError(f"{key} must list {self.num_heads} ints (one per KV head), got {val!r}")
        if any(not 0 <= n <= c for n, c in zip(lengths, caps)):
            raise ValueError(f"lengths {lengths} must be >= 0 and within capacities {caps}")
        p = sum(lengths)
        want = {"k": (p, self.head_dim), "v": (p, self.v_head_dim), "beta": (p,), "pos": (p,), "tok": (p,)}
        for name, shape in want.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape:
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"tensor {name!r} has shape {got}, the metadata says {shape}")
            if name in ("pos", "tok") and (t.dtype != torch.int32 or (t < 0).any()):
                raise ValueError(f"tensor {name!r} must hold int32 values >= 0")
            if name in ("k", "v", "beta") and not torch.isfinite(t).all():
                raise ValueError(f"tensor {name!r} holds NaN or inf")

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, caps: Sequence[int] | None = None) -> None:
        """Replace everything by a :meth:`state` (copied, cast to this layer's dtype and device).

        ``caps`` overrides the saved capacities (each at least its head's length). Call
        :meth:`check_state` first: this method assumes a valid state.
        """
        lengths = list(meta["lengths"])
        self.lengths = [0] * self.num_heads
        self._alloc(list(caps if caps is not None else meta["caps"]))
        dtypes = {"k": self.dtype, "v": self.dtype, "beta": torch.float32, "pos": torch.int32, "tok": torch.int32}
        a = 0
        for h, n in enumerate(lengths):
            for name in FIELDS:
                self.head(name, h)[:n] = tensors[name][a : a + n].to(self.device, dtypes[name])
            a += n
        self.lengths = lengths
        self.step_lengths_before = list(lengths)
        self.refresh_meta()

    # ------------------------------------------------------------------ edits
    def write_head(self, h: int, start: int, end: int, block: Block | None) -> None:
        """Replace slots [start, end) of head h by ``block`` (None = delete), shifting the tail."""
        length = self.lengths[h]
        t = 0 if block is None else len(block)
        tail = length - end
        new_len = start + t + tail
        if new_len > self._caps[h]:
            raise CompactionError(f"replacement grows head {h} beyond its capacity {self._caps[h]}")
        if tail > 0 and t != end - start:
            for name in FIELDS:
                buf = self.head(name, h)
                buf[start + t : start + t + tail] = buf[end:length].clone()
        if t:
            self._put(block, self._offs[h] + start)
        if new_len < length:
            self._clear(h, new_len, length)
        self.lengths[h] = new_len

    def lengths_after(self, per_head: Sequence[HeadSpans]) -> list[int]:
        """Each head's length once its spans ``(start, end, block)`` are replaced (None deletes)."""
        return [
            n - sum(e - s for s, e, _ in spans) + sum(len(b) for _, _, b in spans if b is not None)
            for n, spans in zip(self.lengths, per_head)
        ]

    def rebuild(self, per_head: Sequence[HeadSpans], caps: Sequence[int]) -> tuple:
        """Replace spans of every head (non-overlapping ``(start, end, block)`` per head, None deletes)
        like :meth:`write_head`, but into new buffers of capacities ``caps``: the old buffers are
        left as they were and returned as a :meth:`snapshot` -- not a copy -- for an undo to adopt."""
        lengths = self.lengths_after(per_head)
        if any(n > c for n, c in zip(lengths, caps)):
            raise CompactionError(f"replacements need lengths {lengths}, over capacities {list(caps)}")
        state = self.snapshot(copy=False)
        old = dict(zip(FIELDS, state))
        old_offs, old_lengths = self._offs, self.lengths
        try:
            self._alloc(caps)
            for h, spans in enumerate(per_head):
                src, dst = old_offs[h], self._offs[h]
                kept = 0  # old slots of head h before this one are written
                for start, end, block in sorted([*spans, (old_lengths[h], old_lengths[h], None)], key=lambda x: x[0]):
                    n = start - kept
                    for name in FIELDS:  # the old entries between the previous span and this one
                        getattr(self, name)[dst : dst + n] = old[name][src + kept : src + start]
                    dst += n
                    if block is not None and len(block):
                        self._put(block, dst)
                        dst += len(block)
                    kept = end
        except BaseException:  # out of memory, say: the layer is what it was (nothing wrote the old buffers)
            self.restore(state)
            raise
        self.lengths = lengths
        return state

    def _put(self, block: Block, at: int) -> None:
        """Write a block's entries at flat slot ``at`` onwards, in the buffers' dtypes."""
        for name, part in zip(FIELDS, block.fields):
            buf = getattr(self, name)
            buf[at : at + len(block)] = part.to(buf.dtype)

    def delete_all_heads(self, start: int, end: int) -> None:
        """Delete slots [start, end) of every head of a uniform, even layer (one move per buffer)."""
        if not (self._uniform and self.even):
            raise RuntimeError("delete_all_heads needs a uniform layer with equal head lengths")
        length, k = self.lengths[0], end - start
        for name in FIELDS:
            buf = self._grid_view(name)
            buf[:, start : length - k] = buf[:, end:length].clone()
            buf[:, length - k : length] = _FILL[name]
        self.lengths = [length - k] * self.num_heads

    def rotate(self, delta_pos: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Rotate stored keys by per-slot position deltas (H, >= max_length) and record the new positions.

        The rotation itself: :func:`~agentmem.kv.rope.rotated`.
        """
        lmax = self.max_length
        if lmax == 0:
            return
        rot = 2 * inv_freq.numel()
        if self._uniform:  # all heads at once on the (H, cap, d) view
            keys = self._grid_view("k")[:, :lmax]
            keys[..., :rot] = rotated(keys, delta_pos[:, :lmax], inv_freq)
            valid = self.valid_mask()
            pos = self._grid_view("pos")[:, :lmax]
            pos.copy_(torch.where(valid, pos + delta_pos[:, :lmax].to(torch.int32), pos))
            return
        for h, n in enumerate(self.lengths):
            if n:
                keys = self.head("k", h)[:n]
                keys[..., :rot] = rotated(keys, delta_pos[h, :n], inv_freq)
                pos = self.head("pos", h)[:n]
                pos += delta_pos[h, :n].to(self.device, torch.int32)
