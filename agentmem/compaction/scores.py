"""Per-entry attention scores: the softmax weight each stored entry gets from reference queries.

Shared by the scored-eviction baselines (ranking within a head) and the global head budgets
(ranking across heads and layers): scores come from the head's *full* softmax (all its entries,
beta included), so scores of different heads are comparable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..kv.cache import CompactedCache

_QUERY_BLOCK = 1024  # queries scored at a time (memory: block x head length fp32)


def entry_scores(
    cache: CompactedCache,
    layer_idx: int,
    h: int,
    q: torch.Tensor,
    reduce: str = "max",
    q_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax weight each entry of head h gets from queries q (n, d), under the head's full
    softmax (all its entries, beta included): the largest (``reduce="max"``) or the sum over the
    queries (``"sum"``). With ``q_pos`` (n,), a query sees only entries at positions <= its own
    (causal; a query that sees nothing adds nothing). Returns (L_h,) fp32."""
    layer = cache.layers[layer_idx]
    n_entries = layer.lengths[h]
    k = layer.head("k", h)[:n_entries].float()  # (L, d)
    beta = layer.head("beta", h)[:n_entries].float()  # (L,)
    k_pos = layer.head("pos", h)[:n_entries].to(torch.long)  # (L,)
    scale = cache.spec.scaling[layer_idx]
    out = torch.zeros(n_entries, device=k.device)
    for a in range(0, q.shape[0], _QUERY_BLOCK):
        s = torch.addmm(beta[None, :], q[a : a + _QUERY_BLOCK].float(), k.T, alpha=scale)  # (b, L)
        if q_pos is not None:
            s.masked_fill_(k_pos[None, :] > q_pos[a : a + _QUERY_BLOCK, None].to(k.device), float("-inf"))
        w = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a fully masked row is NaN: no weight
        out = torch.maximum(out, w.amax(dim=0)) if reduce == "max" else out + w.sum(dim=0)
    return out
