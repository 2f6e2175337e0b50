"""Reference queries for Attention Matching: where the queries that a compaction must serve come from.

All queries are post-RoPE, at the positions they were computed at, in the cache's current
position frame (re-basing rotates stored queries together with the keys).

* :class:`QueryBuffer` -- filled by the attention path as the model reads and writes, at no extra
  cost: ``recent`` keeps the last R queries of every layer (a ring), ``context`` a uniform
  reservoir sample over everything read. Online compaction uses ``recent`` by default.
* :class:`QueryCollector` -- an observer for scratch forward passes the session runs for
  *repeat-prefill* (the model is asked to repeat the span verbatim; the queries of that repetition
  are captured) and *self-study* (the model answers a few prompts about the context).
* :class:`QuerySet` -- what compaction receives: per layer (H_q, n, d); :meth:`QuerySet.for_kv_heads`
  stacks each GQA group into (H_kv, rep * n, d) and subsamples reproducibly to a cap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..kv.rope import rotated


@dataclass
class QuerySet:
    """Reference queries: ``per_layer[l]`` is (H_q, n_l, d) (fp32, or bf16 from a bf16 scratch pass:
    consumers compute in fp32); ``positions[l]`` (n_l,) int64,
    the RoPE position each query was computed at, where the source knows it (buffered queries)."""

    source: str
    per_layer: dict[int, torch.Tensor] = field(default_factory=dict)
    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    pass_bytes: int = 0  # a scratch pass's own transient memory (estimate), beside these queries

    @property
    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() for q in self.per_layer.values())

    def _keep(self, layer: int, rows: int, cap: int, seed: int) -> torch.Tensor | None:
        if rows <= cap:
            return None
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        return torch.randperm(rows, generator=g)[:cap].sort().values

    def for_kv_heads(self, layer: int, num_kv_heads: int, cap: int, seed: int = 0) -> torch.Tensor:
        """(H_kv, n', d): the rep query heads of each KV head stacked, at most ``cap`` rows per KV head."""
        q = self.per_layer[layer]  # (H_q, n, d); head hq = h * rep + r
        hq, n, d = q.shape
        rep = hq // num_kv_heads
        stacked = q.reshape(num_kv_heads, rep * n, d)
        keep = self._keep(layer, rep * n, cap, seed)
        return stacked if keep is None else stacked[:, keep.to(q.device)]

    def positions_for_kv_heads(self, layer: int, num_kv_heads: int, cap: int, seed: int = 0) -> torch.Tensor | None:
        """(n',) int64: the positions of the rows :meth:`for_kv_heads` returns (same subsample), or None."""
        pos = self.positions.get(layer)
        if pos is None:
            return None
        rep = self.per_layer[layer].shape[0] // num_kv_heads
        stacked = pos.repeat(rep)  # row r * n + i of the stack is query token i
        keep = self._keep(layer, stacked.numel(), cap, seed)
        return stacked if keep is None else stacked[keep.to(pos.device)]


def rotate_queries(q: torch.Tensor, delta: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries (..., d) moved by ``delta`` positions (a copy)."""
    out = q.clone()
    out[..., : 2 * inv_freq.numel()] = rotated(q, delta, inv_freq)
    return out


class QueryBuffer:
    """Per-layer store of queries fed by the attention path (no extra forward passes).

    mode ``recent``: the last ``capacity`` query tokens (a ring). mode ``context``: a uniform
    reservoir sample of ``capacity`` tokens over everything read. Memory: layers x capacity x H_q x d
    floats in ``dtype`` (the model's, or bf16: ``query_buffer_dtype``), reported as
    ``query_buffer_bytes`` (outside the KV budget unless the session's budget covers all).
    """

    def __init__(
        self,
        num_layers: int,
        num_q_heads: int,
        head_dim: int,
        capacity: int,
        mode: str,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
    ):
        if mode not in ("recent", "context"):
            raise ValueError(f"query buffer mode must be 'recent' or 'context', not {mode!r}")
        self.mode = mode
        self.capacity = capacity
        self.data = torch.zeros(num_layers, capacity, num_q_heads, head_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(num_layers, capacity, dtype=torch.int64, device=device)  # RoPE position per row
        self.filled = [0] * num_layers  # valid rows per layer
        self.seen = [0] * num_layers  # query tokens offered per layer
        self.enabled = True
        self._gen = torch.Generator().manual_seed(seed)
        self._undo: list | None = None  # rows overwritten since begin() (None: no transaction open)
        self._marks: tuple | None = None

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def layout(self) -> tuple:
        """(mode, capacity, dtype): buffers of one layout can stand in for each other."""
        return self.mode, self.capacity, self.data.dtype

    def push(self, layer: int, query: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """query (1, H_q, n, d) as the attention function sees it; positions (n,) its RoPE positions."""
        if not self.enabled:
            return
        cap = self.capacity
        if self.mode == "recent" and query.shape[2] == 1:  # a decode step: one row, no index tensors
            slot = self.seen[layer] % cap
            if self._undo is not None:
                self._undo.append((layer, slot, self.data[layer, slot].clone(), self.pos[layer, slot].clone()))
            self.data[layer, slot] = query[0, :, 0]
            self.pos[layer, slot] = positions[0] if positions is not None else -1
            self.filled[layer] = min(cap, self.filled[layer] + 1)
            self.seen[layer] += 1
            return
        q = query[0].transpose(0, 1).detach()  # (n, H_q, d)
        n = q.shape[0]
        pos = positions.to(self.pos.device, torch.int64) if positions is not None else self.pos.new_full((n,), -1)
        if self.mode == "recent":
            q, pos = q[-cap:], pos[-cap:]
            k = q.shape[0]
            start = self.seen[layer] % cap
            self._save_rows(layer, (torch.arange(k, device=self.data.device) + start) % cap)
            first = min(k, cap - start)
            self.data[layer, start : start + first] = q[:first]
            self.pos[layer, start : start + first] = pos[:first]
            if k > first:
                self.data[layer, : k - first] = q[first:]
                self.pos[layer, : k - first] = pos[first:]
            self.filled[layer] = min(cap, self.filled[layer] + k)
        else:  # reservoir sampling (algorithm R): token j replaces a random slot with prob cap / (j + 1)
            seen = self.seen[layer]
            j = torch.arange(seen, seen + n, dtype=torch.float64)
            draw = torch.floor(torch.rand(n, generator=self._gen, dtype=torch.float64) * (j + 1))
            slot = torch.where(j < cap, j, draw).long()
            rows = {int(d): i for i, d in enumerate(slot.tolist()) if d < cap}  # later tokens win
            if rows:
                dst = torch.tensor(list(rows.keys()), device=q.device)
                src = torch.tensor(list(rows.values()), device=q.device)
                self._save_rows(layer, dst)
                self.data[layer, dst] = q[src]
                self.pos[layer, dst] = pos[src]
            self.filled[layer] = min(cap, seen + n)
        self.seen[layer] += n

    def query_set(self, layers: list[int] | None = None) -> QuerySet:
        layers = list(range(len(self.filled))) if layers is None else layers
        out, pos = {}, {}
        for layer in layers:
            k = self.filled[layer]
            if k:
                out[layer] = self.data[layer, :k].transpose(0, 1)  # (H_q, k, d) a view; consumers cast per block
                if bool((self.pos[layer, :k] >= 0).all()):
                    pos[layer] = self.pos[layer, :k].clone()
        return QuerySet(source=self.mode, per_layer=out, positions=pos)

    def rotate(self, delta: int, inv_freq: list[torch.Tensor]) -> None:
        """Follow a re-basing of the keys (every key moved by ``delta`` positions)."""
        if self._undo is not None:  # rare (a re-basing): keep the whole content
            self._undo.append((None, None, self.data.clone(), self.pos.clone()))
        for layer in range(self.data.shape[0]):
            if self.filled[layer]:
                self.data[layer] = rotate_queries(self.data[layer], delta, inv_freq[layer])
        self.pos += delta

    # ------------------------------------------------------------------ transactions
    def begin(self) -> None:
        """Start recording what changes, so :meth:`abort` can put it back. Only rows about to be
        overwritten are copied (a token's worth per layer when decoding), not the whole buffer."""
        self._undo = []
        self._marks = (list(self.filled), list(self.seen), self._gen.get_state(), self.enabled)

    def commit(self) -> None:
        self._undo = self._marks = None

    def abort(self) -> None:
        """Put back what the buffer held at :meth:`begin` (newest change undone first)."""
        if self._undo is None:
            return
        for layer, rows, data, pos in reversed(self._undo):
            if layer is None:  # a rotation of every layer
                self.data.copy_(data)
                self.pos.copy_(pos)
            else:
                self.data[layer, rows] = data
                self.pos[layer, rows] = pos
        self.filled, self.seen, rng, self.enabled = self._marks
        self.filled, self.seen = list(self.filled), list(self.seen)
        self._gen.set_state(rng)
        self._undo = self._marks = None

    def _save_rows(self, layer: int, rows: torch.Tensor) -> None:
        if self._undo is not None:
            self._undo.append((layer, rows, self.data[layer, rows].clone(), self.pos[layer, rows].clone()))

    def copy(self) -> QueryBuffer:
        """An independent buffer with the same content."""
        other = copy.copy(self)
        other.data, other.pos = self.data.clone(), self.pos.clone()
        other.filled, other.seen = list(self.filled), list(self.seen)
        other._gen = torch.Generator().set_state(self._gen.get_state())
        other._undo = other._marks = None
        return other

    def rows_in_order(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, H_q, d) queries and (n,) positions of a layer, oldest first for a ring (slot order for
        a reservoir, which has no order)."""
        k = self.filled[layer]
        idx = torch.arange(k, device=self.data.device)
        if self.mode == "recent" and k == self.capacity:
            idx = (idx + self.seen[layer]) % self.capacity  # the oldest row follows the newest
        return self.data[layer, idx], self.pos[layer, idx]

    def absorb(self, other: QueryBuffer) -> None:
        """Take the rows of another buffer (of another mode or capacity), oldest first."""
        for layer in range(min(len(self.filled), len(other.filled))):
            if other.filled[layer]:
                q, pos = other.rows_in_order(layer)
                self.push(layer, q.transpose(0, 1)[None].to(self.data.dtype), pos)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """For a file: tensors ``data`` (layers, rows, H_q, d), ``pos`` (layers, rows) int64 (rows =
        the most any layer holds; the rest is zeros) and ``rng`` (the reservoir sampler's state);
        meta ``mode``, ``capacity``, ``filled``, ``seen``, ``enabled``."""
        rows = max(self.filled, default=0)
        tensors = {
            "data": self.data[:, :rows].cpu().clone(),
            "pos": self.pos[:, :rows].cpu().clone(),
            "rng": self._gen.get_state(),
        }
        meta = {"mode": self.mode, "capacity": self.capacity, "filled": list(self.filled), "seen": list(self.seen)}
        return tensors, {**meta, "enabled": self.enabled}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Replace the content by a :meth:`state` of a buffer of the same shape; ValueError otherwise
        (checked before anything changes)."""
        layers, cap = self.data.shape[0], self.capacity
        if meta.get("mode") != self.mode or meta.get("capacity") != cap:
            raise ValueError(
                f"query buffer ({meta.get('mode')!r}, {meta.get('capacity')} tokens) differs from this "
                f"session's ({self.mode!r}, {cap} tokens)"
            )
        filled, seen = meta.get("filled"), meta.get("seen")
        if not (isinstance(filled, list) and isinstance(seen, list) and len(filled) == len(seen) == layers):
            raise ValueError(f"query buffer filled/seen must list {layers} layers")
        if any(not isinstance(f, int) or not 0 <= f <= cap for f in filled):
            raise ValueError(f"query buffer filled counts {filled} outside [0, {cap}]")
        rows = max(filled, default=0)
        data, pos, rng = tensors.get("data"), tensors.get("pos"), tensors.get("rng")
        if data is None or tuple(data.shape) != (layers, rows, *self.data.shape[2:]):
            raise ValueError(f"query buffer data has shape {None if data is None else tuple(data.shape)}")
        if pos is None or tuple(pos.shape) != (layers, rows) or rng is None or rng.dtype != torch.uint8:
            raise ValueError("query buffer positions or sampler state missing or malformed")
        if not torch.isfinite(data).all():
            raise ValueError("query buffer data holds NaN or inf")
        self.data.zero_()
        self.pos.zero_()
        self.data[:, :rows] = data.to(self.data.device, self.data.dtype)
        self.pos[:, :rows] = pos.to(self.pos.device, torch.int64)
        self._gen.set_state(rng.clone())
        self.filled, self.seen = [int(f) for f in filled], [int(s) for s in seen]
        self.enabled = bool(meta.get("enabled", True))


class QueryCollector:
    """Observer for scratch passes: keeps, per layer, at most ``cap`` query tokens (evenly spaced),
    (H_q, n, d) in ``dtype``."""

    def __init__(self, layers: set[int] | None = None, cap: int = 512, dtype: torch.dtype | None = None):
        self.layers = layers
        self.cap = cap
        self.dtype = dtype  # what the queries are kept in (None: as computed)
        self.parts: dict[int, list[torch.Tensor]] = {}

    def __call__(self, layer: int, query: torch.Tensor) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        # a bf16 pass keeps bf16 queries: half the memory, no precision it had (users cast per block)
        self.parts.setdefault(layer, []).append(query[0].detach().to(self.dtype or query.dtype, copy=True))

    def result(self, source: str) -> QuerySet:
        out = {}
        for layer, parts in self.parts.items():
            total = sum(p.shape[1] for p in parts)
            if total > self.cap:  # pick from each part, so only the kept rows are ever copied together
                keep = torch.linspace(0, total - 1, self.cap).round().long()
                picked, start = [], 0
                for p in parts:
                    mine = keep[(keep >= start) & (keep < start + p.shape[1])] - start
                    picked.append(p[:, mine.to(p.device)])
                    start += p.shape[1]
                parts = picked
            out[layer] = torch.cat(parts, dim=1)
            self.parts[layer] = []  # freed as it goes
        return QuerySet(source=source, per_layer=out)
