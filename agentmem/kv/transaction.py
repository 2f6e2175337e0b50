"""The undo state of an all-or-nothing cache operation (:meth:`~agentmem.kv.cache.CompactedCache.begin`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .layer import CacheLayer


@dataclass
class Transaction:
    """What :meth:`~agentmem.kv.cache.CompactedCache.abort` puts back: lengths, capacities and
    positions at ``begin``, the layers structurally edited since as they were (copies, or their old
    buffers after a copy-on-write edit), and the query buffer's content."""

    lengths: list[list[int]]
    caps: list[list[int]]
    logical_length: int
    position_offset: int
    query_buffer: object
    layers: dict[int, tuple] = field(default_factory=dict)  # layer index -> CacheLayer.snapshot()
    undo_bytes: int = 0  # bytes of the layers in ``layers``

    def keep(self, layer_idx: int, state: tuple, nbytes: int) -> int:
        """Record a layer's state from before its first structural edit; returns :attr:`undo_bytes`."""
        self.layers[layer_idx] = state
        self.undo_bytes += nbytes
        return self.undo_bytes

    def restore_layers(self, layers: Sequence[CacheLayer]) -> None:
        """Put every layer back as it was at ``begin``: the kept states, then the lengths (appends
        since are dropped) and the capacities."""
        for i, layer in enumerate(layers):
            if i in self.layers:
                layer.restore(self.layers[i])
            layer.truncate_to(self.lengths[i])
            if layer.caps != self.caps[i]:
                layer.resize(self.caps[i])
            layer.refresh_meta()
