"""Span edits of a cache layer: what :meth:`~agentmem.kv.cache.CompactedCache.replace_spans` takes,
its checks, and the capacities a layer is given back after a compaction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import CompactionError
from .layer import CacheLayer, HeadSpans, round_up


def released_caps(lengths: Sequence[int], caps: Sequence[int], spare: int, uneven_only: bool) -> list[int]:
    """Per-head capacities keeping ``spare`` slots beyond each length (rounded up), at most ``caps``;
    ``uneven_only``: ``caps`` as they are when every head holds the same length (such a layer
    refills its own slots)."""
    if uneven_only and min(lengths) == max(lengths):
        return list(caps)
    return [min(c, round_up(a + spare)) for a, c in zip(lengths, caps)]


def check_spans(layer: CacheLayer, layer_idx: int, per_head: Sequence[HeadSpans]) -> None:
    """Raise :class:`CompactionError` unless ``per_head`` is a valid replacement for ``layer``: the
    spans of every KV head, inside its entries and not overlapping, each block of the layer's
    shapes, finite keys, values and beta, and no longer than the span it replaces."""
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
                raise CompactionError(f"layer {layer_idx} head {h}: block of {t} entries replaces only {end - start}")
            for name in ("keys", "values", "beta"):
                if not torch.isfinite(getattr(block, name)).all():
                    raise CompactionError(f"layer {layer_idx} head {h}: non-finite {name} in compacted block")
