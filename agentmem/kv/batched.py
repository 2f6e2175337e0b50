"""BatchedCaches: several sessions' caches read as one batch by one model call (decode steps)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from .cache import CompactedCache


class BatchedCaches(Cache):
    """Several sessions' :class:`CompactedCache` s read as one batch: row b of a model call is
    ``caches[b]``'s sequence (one new token each, a decode step of several sessions at once).

    ``update`` hands row b's keys and values to ``caches[b]``; agentmem attention then attends
    each row over its own cache (:func:`agentmem.kv.attention.agentmem_attention_forward`), so every
    session computes exactly what it computes alone, while the model's matrix products run once
    for the whole batch. Each cache must have had ``begin_forward(1)`` called.
    """

    def __init__(self, caches: Sequence[CompactedCache]):
        if not caches:
            raise ValueError("BatchedCaches needs at least one cache")
        super().__init__(layers=caches[0].layers)  # for transformers' per-layer queries (is_sliding ...)
        self.caches = list(caches)
        self.returned: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.caches)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """key_states / value_states (B, H_kv, 1, d): row b goes to caches[b]; returns them unchanged."""
        if key_states.shape[0] != len(self.caches):
            raise ValueError(f"batch of {key_states.shape[0]} rows for {len(self.caches)} caches")
        for b, cache in enumerate(self.caches):
            self.returned[b] = cache.update(key_states[b : b + 1], value_states[b : b + 1], layer_idx)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.caches[0].get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0  # agentmem attention builds each row's mask from its own cache

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False
