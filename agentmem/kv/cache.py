"""CompactedCache: a byte-budgeted KV cache whose entries carry a per-key attention bias.

One :class:`~agentmem.kv.layer.CacheLayer` per decoder layer holds keys, values, an fp32 beta,
the RoPE position and the token index of every entry, with per-KV-head lengths and per-KV-head
capacities (padding carries beta = -inf). ``kv_bytes`` counts every byte of those buffers (capacity
and padding included); the budget bounds it at all times, including the moment a buffer is
re-allocated (old and new copies both count). Capacities grow per head; :meth:`shrink_to_fit`
trims each head to its own length, so after a non-uniform compaction memory follows the payload.

Logical length (tokens seen) and physical length (entries stored) are separate. RoPE positions
are never renumbered by compaction; positions.py may rotate keys by an offset (re-basing) or
compress the positions of the far past, always recording the new position in ``pos``.

The narrow API used by policies and compaction: :meth:`CacheLayer.read_span`,
:meth:`CompactedCache.replace_spans` (atomic), :meth:`CompactedCache.fits` / ``reserve``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from ..errors import BudgetError, CompactionError
from ..spec import ModelSpec
from ..units import MiB
from .layer import ALIGN, FIELDS, GROWTH, CacheLayer, round_up
from .spans import HeadSpans, check_spans, released_caps
from .transaction import Transaction


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
        self._txn: Transaction | None = None
        self._txn_depth = 0
        self.peak_undo_bytes = 0  # most bytes of old layers one operation held to undo itself
        self._release: tuple[int, bool] | None = None  # (spare, uneven_only) inside releasing()

    # ------------------------------------------------------------------ accounting
    @property
    def kv_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def payload_bytes(self) -> int:
        """Bytes of entries in use (keys, values, beta, pos, tok), excluding spare capacity and padding."""
        return sum(layer.payload_entries * layer.head_slot_bytes() for layer in self.layers)

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
    def _plan_capacities(self, n: int) -> list[list[int]] | None:
        """Per-layer, per-head capacities that hold n more tokens in every head, or None if the
        budget cannot hold them.

        Head h of a layer needs ``lengths[h] + n`` slots; a head that lacks room grows on its own.
        Tries geometric growth first, then exact sizes. A plan is accepted only if its peak, counting
        the old and the new buffer of the layer being re-allocated, stays within ``max_bytes``.
        """
        if all(a + n <= c for layer in self.layers for a, c in zip(layer.lengths, layer.caps)):
            return [layer.caps for layer in self.layers]
        # geometric growth, else to the next multiple of ALIGN, else exact: near the budget a layer
        # is re-allocated every ALIGN tokens rather than on every token
        growth = (
            lambda m, c: round_up(max(m, int(c * GROWTH), ALIGN)),
            lambda m, c: round_up(m),
            lambda m, c: m,
        )
        for grow in growth:
            plan = []
            for layer in self.layers:
                plan.append([c if c >= a + n else grow(a + n, c) for a, c in zip(layer.lengths, layer.caps)])
            if self._plan_peak(plan) <= (self.max_bytes if self.max_bytes is not None else math.inf):
                return plan
        return None

    def _plan_peak(self, plan: list[list[int]]) -> int:
        """Largest kv_bytes while re-allocating layer by layer to ``plan`` (per-layer, per-head caps)."""
        current = [layer.nbytes for layer in self.layers]
        total = sum(current)
        peak = total
        for i, (layer, caps) in enumerate(zip(self.layers, plan)):
            if caps != layer.caps:
                new = sum(caps) * layer.head_slot_bytes()
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
                f"{n} more tokens need {n * self.bytes_per_token() / MiB:.2f} MiB more KV memory; "
                f"the cache holds {self.kv_bytes / MiB:.2f} of max {self.max_bytes / MiB:.2f} MiB"
            )
        for layer, caps in zip(self.layers, plan):
            if caps != layer.caps:
                self._note_peak(sum(caps) * layer.head_slot_bytes())
                layer.resize(caps)
        self._note_peak()

    def max_tokens(self, max_bytes: int | None = ...) -> int:
        """Most tokens per head the budget (default :attr:`max_bytes`) can ever hold (one layer may
        be mid re-allocation)."""
        max_bytes = self.max_bytes if max_bytes is ... else max_bytes
        if max_bytes is None:
            return 1 << 30
        per_tok = self.bytes_per_token()
        biggest = max(layer.slot_bytes() for layer in self.layers)
        return max(0, int(max_bytes // (per_tok + biggest)))

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

    def shrink_to_fit(self, spare: int = 0, uneven_only: bool = False) -> None:
        """Release capacity beyond each head's length + ``spare`` (rounded up), when the budget
        allows the transient copy of the layer. Heads of one layer may end with different capacities.
        ``uneven_only``: leave layers whose heads hold equal lengths alone (they refill their own slots)."""
        for layer in self.layers:
            caps = released_caps(layer.lengths, layer.caps, spare, uneven_only)
            if sum(caps) < sum(layer.caps):
                extra = sum(caps) * layer.head_slot_bytes()
                if self.max_bytes is None or self.kv_bytes + extra <= self.max_bytes:
                    self._note_peak(extra)
                    layer.resize(caps)

    # ------------------------------------------------------------------ forward protocol
    def begin_forward(self, n: int) -> torch.Tensor:
        """Prepare n new tokens; returns their RoPE position ids (1, n) for the model call."""
        p0 = self.next_position
        self.step_first_pos = p0
        self._new_pos = torch.arange(p0, p0 + n, dtype=torch.int32, device=self.device)
        self._new_tok = torch.arange(
            self.logical_length, self.logical_length + n, dtype=torch.int32, device=self.device
        )
        return self._new_pos.to(torch.long)[None, :]

    @property
    def forward_positions(self) -> torch.Tensor | None:
        """(n,) int32 RoPE positions of the tokens of the forward in progress (None between forwards)."""
        return self._new_pos

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
            layer.refresh_meta()
        self._new_pos = self._new_tok = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Append the new keys/values (1, H_kv, n, d) of a layer; returns what attention reads.

        A uniform layer returns (1, H_kv, L, d) views of its keys and values (L = longest head).
        A non-uniform layer returns the new states unchanged: only agentmem attention, which reads
        the layer's per-head runs itself, can attend over it (no padded copy is built per step).
        """
        if self._new_pos is None or self._new_pos.numel() != key_states.shape[2]:
            raise RuntimeError(
                "an agentmem cache cannot be handed to model.generate() or a plain forward: a session drives it, "
                "making room (compacting) between model calls. Use AgentSession(model=model, tokenizer=tokenizer, "
                "max_kv_mb=...).generate(prompt, max_new_tokens=..., top_k=..., logits_processor=..., streamer=...), "
                "or for a loop of your own session.next_logits() and session.append_tokens([token])"
            )
        if key_states.shape[0] != 1:
            raise ValueError("CompactedCache holds one sequence (batch size 1)")
        layer = self.layers[layer_idx]
        layer.append(key_states, value_states, self._new_pos, self._new_tok)
        if layer.uniform:  # (1, H, L, d) views: the whole layer for one attention call
            return layer.kv4d(layer.max_length)
        # heads of different capacities: agentmem attention reads each head's run from the layer
        return key_states, value_states

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

    # ------------------------------------------------------------------ transactions
    def begin(self) -> None:
        """Start an all-or-nothing operation: :meth:`abort` puts back exactly what the cache (and its
        query buffer) held here. Nestable; only the outermost begin / commit / abort counts.

        Cheap until something is edited structurally: appends are undone by lengths, capacities by
        a resize; a layer's first compaction or eviction is copy-on-write on a CPU (its old buffers
        are kept, :meth:`replace_spans`), and any other first structural edit -- key rotation, or
        any edit of a CUDA cache -- copies the layer just before (:meth:`touch`). ``peak_bytes``
        stays a high-water mark.
        """
        self._txn_depth += 1
        if self._txn_depth > 1:
            return
        qb = self.query_buffer
        self._txn = Transaction(
            lengths=self.snapshot_lengths(),
            caps=[layer.caps for layer in self.layers],
            logical_length=self.logical_length,
            position_offset=self.position_offset,
            query_buffer=qb,
        )
        if qb is not None:
            qb.begin()

    def touch(self, layer_idx: int) -> None:
        """Layer ``layer_idx`` is about to be edited in place: keep a copy for :meth:`abort` (in host
        memory for a CUDA cache, :attr:`undo_device`; its bytes count in :attr:`peak_undo_bytes`)."""
        txn = self._txn
        if txn is not None and layer_idx not in txn.layers:
            layer = self.layers[layer_idx]
            self._keep_undo(layer_idx, layer.snapshot(self.undo_device), layer.nbytes)

    def _keep_undo(self, layer_idx: int, state: tuple, nbytes: int) -> None:
        """Record a layer's state from before the open operation's first structural edit of it."""
        self.peak_undo_bytes = max(self.peak_undo_bytes, self._txn.keep(layer_idx, state, nbytes))

    @property
    def undo_device(self) -> torch.device:
        """Where undo copies live: host memory for an accelerator's cache (its memory is the budget's)."""
        return torch.device("cpu")

    def commit(self) -> None:
        """End the operation begun last, keeping what it did."""
        self._txn_depth = max(0, self._txn_depth - 1)
        if self._txn_depth == 0 and self._txn is not None:
            if self._txn.query_buffer is not None:
                self._txn.query_buffer.commit()
            self._txn = None

    def abort(self) -> None:
        """End the operation begun last; the outermost one puts everything back as at :meth:`begin`."""
        self._txn_depth = max(0, self._txn_depth - 1)
        txn = self._txn
        if self._txn_depth > 0 or txn is None:
            return
        self._txn = None
        txn.restore_layers(self.layers)
        self.logical_length = txn.logical_length
        self.position_offset = txn.position_offset
        self._new_pos = self._new_tok = None
        if self.query_buffer is not None and self.query_buffer is not txn.query_buffer:
            self.query_buffer.commit()  # a buffer made during the operation (a policy change) goes
        self.query_buffer = txn.query_buffer
        if txn.query_buffer is not None:
            txn.query_buffer.abort()

    # ------------------------------------------------------------------ compaction API
    def validate_spans(self, staged: Sequence[tuple[int, Sequence[HeadSpans]]]) -> None:
        """Check replacements for several layers before any is written (see :meth:`replace_spans`)."""
        for layer_idx, per_head in staged:
            check_spans(self.layers[layer_idx], layer_idx, per_head)

    def replace_spans(self, layer_idx: int, per_head: Sequence[HeadSpans]) -> None:
        """Atomically replace spans of every KV head of one layer by blocks (None = delete).

        ``per_head[h]`` lists head h's non-overlapping ``(start, end, block)``, in slot indices of
        the current state. Every block is validated (shapes, finite keys, values and beta, no longer
        than its span) before anything is written; a bad block raises :class:`CompactionError` and
        leaves the layer untouched.

        Inside an operation (:meth:`begin`) on a cache whose undo copies would live beside it (a
        CPU's), the first edit of a layer is copy-on-write: the result goes into new buffers and the
        old ones become the undo copy as they are -- no copy of the whole layer, and the new buffers
        are sized by :meth:`releasing` when the caller gives back capacity afterwards anyway.
        """
        check_spans(self.layers[layer_idx], layer_idx, per_head)
        if not any(end > start or block is not None for spans in per_head for start, end, block in spans):
            return  # nothing to replace: no copy, no new buffers
        layer = self.layers[layer_idx]
        if self._copy_on_write(layer_idx):
            nbytes = layer.nbytes  # the old buffers' size, counted as a copy's would be
            caps = self._caps_after(layer, layer.lengths_after(per_head))
            self._keep_undo(layer_idx, layer.rebuild(per_head, caps), nbytes)
        else:
            self.touch(layer_idx)
            for h, spans in enumerate(per_head):
                for start, end, block in sorted(spans, key=lambda x: -x[0]):  # last first: indices stay valid
                    if block is None and start == end:
                        continue
                    layer.write_head(h, start, end, block)
        layer.refresh_meta()

    def _copy_on_write(self, layer_idx: int) -> bool:
        """Whether the next structural edit of a layer goes to new buffers (:meth:`replace_spans`)."""
        txn = self._txn
        return txn is not None and layer_idx not in txn.layers and self.layers[layer_idx].device == self.undo_device

    @contextmanager
    def releasing(self, spare: int = 0, uneven_only: bool = False) -> Iterator[None]:
        """Copy-on-write edits inside allocate each layer at the capacity ``shrink_to_fit(spare,
        uneven_only)`` would leave it, for a caller that calls it afterwards (a compaction): its
        edited layers are then already that size, and never held at both sizes."""
        previous, self._release = self._release, (spare, uneven_only)
        try:
            yield
        finally:
            self._release = previous

    def _caps_after(self, layer: CacheLayer, lengths: list[int]) -> list[int]:
        """Capacities for a copy-on-write edit leaving ``lengths``: the layer's own, or inside
        :meth:`releasing` those :meth:`shrink_to_fit` would give it."""
        return layer.caps if self._release is None else released_caps(lengths, layer.caps, *self._release)

    def evict_all_heads(self, layer_idx: int, start: int, end: int) -> None:
        """Delete slots [start, end) of every head of an even layer (one vectorised move when uniform)."""
        layer = self.layers[layer_idx]
        if not (layer.even and layer.uniform) or self._copy_on_write(layer_idx):
            self.replace_spans(layer_idx, [[(start, end, None)]] * layer.num_heads)
            return
        length = layer.lengths[0]
        if not 0 <= start <= end <= length:
            raise CompactionError(f"layer {layer_idx}: span [{start}, {end}) outside [0, {length})")
        if end == start:
            return
        self.touch(layer_idx)
        layer.delete_all_heads(start, end)
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
            dead = (layer.valid_mask() & (layer.grid("pos", lmax).to(torch.long) <= first - w)).sum(dim=1).tolist()
            if max(dead) < max(1, min_dead):
                continue
            if (
                len(set(dead)) == 1 and layer.even and layer.uniform
            ):  # entries are position-ordered: the dead ones are a prefix
                self.evict_all_heads(idx, 0, dead[0])
            else:
                self.replace_spans(idx, [[(0, d, None)] for d in dead])
            dropped += sum(dead)
        return dropped

    def clone(self) -> CompactedCache:
        """Independent copy (same budget) for scratch work such as scoring text that does not fit."""
        other = CompactedCache(self.spec, self.dtype, self.device, self.max_bytes)
        for src, dst in zip(self.layers, other.layers):
            dst.restore(src.snapshot())
        other.logical_length = self.logical_length
        other.position_offset = self.position_offset
        other.peak_bytes = self.peak_bytes
        other.peak_undo_bytes = self.peak_undo_bytes
        if self.query_buffer is not None:
            other.query_buffer = self.query_buffer.copy()
        return other

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything the cache holds, for a file: ``(tensors, meta)``.

        tensors: ``layers.{i}.{k,v,beta,pos,tok}``, each layer packed by :meth:`CacheLayer.state`.
        meta: ``logical_length``, ``position_offset``, ``peak_bytes``, ``kv_bytes``, ``dtype`` and
        ``layers`` (per layer: per-head ``lengths`` and ``caps``).
        """
        tensors, layers = {}, []
        for i, layer in enumerate(self.layers):
            t, m = layer.state()
            tensors.update({f"layers.{i}.{name}": v for name, v in t.items()})
            layers.append(m)
        meta = {
            "logical_length": self.logical_length,
            "position_offset": self.position_offset,
            "peak_bytes": self.peak_bytes,
            "kv_bytes": self.kv_bytes,
            "dtype": str(self.dtype).removeprefix("torch."),
            "layers": layers,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Replace everything by a :meth:`state` (tensors copied, cast to this cache's dtype/device).

        Every layer is checked (shapes against the metadata, finite keys/values/beta) before anything
        is written: a bad state raises ValueError and leaves the cache as it was. When the budget
        cannot hold the saved capacities, heads get just what their entries need; if even that does
        not fit, BudgetError says which budget would.
        """
        layers = meta.get("layers")
        if not isinstance(layers, list) or len(layers) != len(self.layers):
            raise ValueError(f"the state has {len(layers or [])} layers, the model {len(self.layers)}")
        split = [{name: tensors.get(f"layers.{i}.{name}") for name in FIELDS} for i in range(len(layers))]
        for i, (layer, t, m) in enumerate(zip(self.layers, split, layers)):
            try:
                layer.check_state(t, m)
            except ValueError as exc:
                raise ValueError(f"layer {i}: {exc}") from exc
        for key in ("logical_length", "position_offset", "peak_bytes"):
            if not isinstance(meta.get(key), int) or meta[key] < 0:
                raise ValueError(f"{key} must be an int >= 0, got {meta.get(key)!r}")
        caps = [m["caps"] for m in layers]
        for trim in (lambda n, c: c, lambda n, c: min(c, round_up(n)), lambda n, c: n):
            caps = [[trim(n, c) for n, c in zip(m["lengths"], m["caps"])] for m in layers]
            need = sum(sum(c) * layer.head_slot_bytes() for c, layer in zip(caps, self.layers))
            if self.max_bytes is None or need <= self.max_bytes:
                break
        else:
            raise BudgetError(
                f"the saved cache needs {need / MiB:.4g} MiB of KV memory in {self.dtype}; max_kv_mb="
                f"{self.max_bytes / MiB:.4g} is too small: use max_kv_mb >= {math.ceil(need / MiB * 100) / 100:.2f}"
            )
        for layer, t, m, c in zip(self.layers, split, layers, caps):
            layer.load_state(t, m, c)
        self.logical_length = meta["logical_length"]
        self.position_offset = meta["position_offset"]
        self._new_pos = self._new_tok = None
        self.peak_bytes = 0
        self._note_peak(max(0, meta["peak_bytes"] - self.kv_bytes))
