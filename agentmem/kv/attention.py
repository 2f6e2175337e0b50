"""The beta-aware attention function, registered with transformers as ``attn_implementation="agentmem"``.

Decode-time attention over a compacted cache is ``softmax(s * q K^T + beta) V``: beta is an additive
per-key bias. The function reads beta, per-head lengths, positions and sliding windows from the
:class:`~agentmem.kv.cache.CompactedCache` passed as the ``agentmem_cache`` forward kwarg, and builds
the mask itself (transformers' mask is ignored). When a layer holds no bias and no slot can fall
out of a sliding window, no float mask is built at all. Without ``agentmem_cache`` (plain use of
the model, e.g. ``model.generate``) it is exactly transformers' SDPA attention.

GQA: instead of repeating K/V, the ``rep`` query heads of a KV head are stacked along the query
axis: (1, H_q, n, d) -> (1, H_kv, rep*n, d), so a per-KV-head bias broadcasts without copies.

Layouts: a uniform layer (every KV head has the same capacity) is attended in one call on the
(1, H_kv, L, d) views the cache's ``update`` returns. A non-uniform layer (heads of different
capacities after a non-uniform compaction) is attended one KV head at a time, on each head's own
run of slots read from the layer (no padded copy is built): :func:`_per_head_attention`; a decode
step in fp32 on a CPU as matrix products, over the whole layer at once when it is small
(:func:`_per_head_decode`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import UnsupportedModelError
from .batched import BatchedCaches

NAME = "agentmem"


def _layer_bias(layer, cache, n: int, length: int) -> torch.Tensor | None:
    """Additive mask for n new queries over ``length`` slots.

    Returns None (plain causal decode), a bool (1, 1, n, L) causal mask shared by all heads, or a
    float (1, H, n, L) bias holding beta, with -inf for padding, future slots and slots outside a
    sliding window.
    """
    window = layer.sliding_window
    out_of_window = _out_of_window(layer, cache, n)
    if not layer.has_bias and not out_of_window:
        if n == 1:
            return None
        j = torch.arange(length, device=layer.device)
        i = torch.arange(n, device=layer.device)
        return (j[None, :] <= (length - n) + i[:, None])[None, None]
    heads = layer.num_heads
    beta = layer.grid("beta", length)  # (H, L) fp32 view, -inf on padding
    if n == 1 and not out_of_window:
        return beta[None, :, None, :]
    bias = beta[:, None, :].expand(heads, n, length).clone()  # (H, n, L)
    j = torch.arange(length, device=layer.device)
    i = torch.arange(n, device=layer.device)
    before = torch.tensor(layer.step_lengths_before, device=layer.device)
    future = j[None, None, :] > before[:, None, None] + i[None, :, None]  # (H, n, L)
    hidden = future
    if out_of_window:
        qpos = cache.step_first_pos + i  # (n,)
        far = (qpos[None, :, None] - layer.grid("pos", length)[:, None, :].to(torch.long)) >= window
        hidden = hidden | far
    bias.masked_fill_(hidden, float("-inf"))
    return bias[None]


def agentmem_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (1, H_q, n, d); key/value (1, H_kv, L, d) as returned by the cache -> (1, n, H_q, d_v).

    With a :class:`~agentmem.kv.batched.BatchedCaches` (query (B, H_q, 1, d)), row b attends over
    ``caches[b]`` alone, exactly as that session's own forward would -> (B, 1, H_q, d_v).
    """
    cache = kwargs.pop("agentmem_cache", None)
    softcap = kwargs.get("softcap")
    if isinstance(cache, BatchedCaches):
        rows = [
            _attend(module, query[b : b + 1], *cache.returned[b], c, scaling, softcap)
            for b, c in enumerate(cache.caches)
        ]
        return torch.cat(rows, dim=0), None
    if cache is None:
        if softcap is not None:
            from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

            return eager_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return _attend(module, query, key, value, cache, scaling, softcap), None


def _attend(module, query, key, value, cache, scaling: float | None, softcap: float | None) -> torch.Tensor:
    """One sequence's attention over its :class:`~agentmem.kv.cache.CompactedCache` -> (1, n, H_q, d_v)."""
    if not getattr(module, "is_causal", True):
        raise UnsupportedModelError("bidirectional attention layers are not supported by agentmem")
    layer = cache.layers[module.layer_idx]
    if cache.query_observer is not None:  # a scratch pass collecting reference queries
        cache.query_observer(module.layer_idx, query)
    elif cache.query_buffer is not None:  # recent / context queries for online compaction
        cache.query_buffer.push(module.layer_idx, query, cache.forward_positions)
    _, hq, n, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    if not layer.uniform:
        return _per_head_attention(layer, cache, query, scale, softcap)
    hkv, length = key.shape[1], key.shape[2]
    rep = hq // hkv
    bias = _layer_bias(layer, cache, n, length)

    if softcap is None and bias is None:  # plain decode step: same call as transformers' SDPA path
        out = F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=rep > 1)
        return out.transpose(1, 2).contiguous()
    if softcap is None and bias is not None and bias.dtype == torch.bool:  # causal block, no bias: one shared mask
        if length == n:
            out = F.scaled_dot_product_attention(query, key, value, scale=scale, is_causal=True, enable_gqa=rep > 1)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale, enable_gqa=rep > 1)
        return out.transpose(1, 2).contiguous()

    # stack the rep query heads of each KV head along the query axis
    q = query.reshape(1, hkv, rep * n, d)  # hq = h * rep + r, so this groups (r, i) under h
    if bias is not None:
        if bias.dtype != torch.bool:
            bias = bias.to(query.dtype)
        if n > 1 and rep > 1:
            bias = bias[:, :, None].expand(1, bias.shape[1], rep, n, length).reshape(1, bias.shape[1], rep * n, length)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=bias, scale=scale)
    else:
        scores = torch.matmul(q, key.transpose(2, 3)).float() * scale
        scores = torch.tanh(scores / softcap) * softcap
        if bias is not None:
            scores = scores.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else scores + bias.float()
        out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    out = out.reshape(1, hq, n, value.shape[-1])
    return out.transpose(1, 2).contiguous()


def _out_of_window(layer, cache, n: int) -> bool:
    """Whether the last of n new queries can see past the layer's sliding window (some slot is hidden)."""
    window = layer.sliding_window
    q_last = cache.step_first_pos + n - 1
    return window is not None and layer.min_pos is not None and q_last - layer.min_pos >= window


def _head_bias(layer, cache, h: int, n: int, length: int) -> torch.Tensor | None:
    """fp32 (n, L) additive mask of KV head h for n new queries over its L entries, or None.

    The new entries are the last n of the head: slot j is visible to query i iff j <= L - n + i.
    Adds the head's beta (when the layer has any) and hides slots outside a sliding window.
    """
    out_of_window = _out_of_window(layer, cache, n)
    window = layer.sliding_window
    if n == 1 and not out_of_window:  # a decode step: the head's beta as it is stored (a view)
        return layer.run(h)[2][None, :length] if layer.has_beta else None
    dev = layer.device
    bias = torch.zeros(n, length, dtype=torch.float32, device=dev)
    if layer.has_beta:
        bias += layer.head("beta", h)[:length]
    hidden = None
    if n > 1:
        j = torch.arange(length, device=dev)
        i = torch.arange(n, device=dev)
        hidden = j[None, :] > (length - n) + i[:, None]  # (n, L)
    if out_of_window:
        qpos = cache.step_first_pos + torch.arange(n, device=dev)
        far = (qpos[:, None] - layer.head("pos", h)[None, :length].to(torch.long)) >= window
        hidden = far if hidden is None else hidden | far
    if hidden is not None:
        bias.masked_fill_(hidden, float("-inf"))
    return bias


def _per_head_attention(layer, cache, query: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention of query (1, H_q, n, d) over a non-uniform layer, one KV head at a time -> (1, n, H_q, d_v).

    Head h: its rep query heads stacked to (1, 1, rep*n, d) against its own (1, 1, L_h, d) keys and
    values (views into the layer's flat buffers), with :func:`_head_bias` as the mask.
    """
    _, hq, n, d = query.shape
    hkv = layer.num_heads
    rep = hq // hkv
    if n == 1 and softcap is None and _products_decode(layer, query) and not _out_of_window(layer, cache, n):
        return _per_head_decode(layer, query, scale)
    out = query.new_empty(1, hq, n, layer.v_head_dim)
    for h in range(hkv):
        length = layer.lengths[h]
        k, v, _ = layer.run(h)
        k, v = k[None, None, :length], v[None, None, :length]  # (1, 1, L, d)
        q = query[:, h * rep : (h + 1) * rep].reshape(1, 1, rep * n, d)  # row r * n + i
        bias = _head_bias(layer, cache, h, n, length)
        if bias is not None and rep > 1 and n > 1:
            bias = bias[None].expand(rep, n, length).reshape(rep * n, length)
        if softcap is None:
            mask = None if bias is None else bias.to(query.dtype)[None, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)).float() * scale
            scores = torch.tanh(scores / softcap) * softcap
            if bias is not None:
                scores = scores + bias
            o = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        out[:, h * rep : (h + 1) * rep] = o.view(1, rep, n, -1)
    return out.transpose(1, 2).contiguous()


PRODUCTS_DECODE = True  # False: every per-head step through SDPA (tests compare the two paths)


def _products_decode(layer, query: torch.Tensor) -> bool:
    """Whether a decode step over a non-uniform layer goes through :func:`_per_head_decode`: fp32 on a
    CPU, where it measured faster than one SDPA call per KV head (bf16/fp16 and CUDA keep SDPA's kernels).
    Not under a CPU autocast (a bf16 scratch pass): its products would come out in bf16."""
    return (
        PRODUCTS_DECODE
        and query.device.type == "cpu"
        and query.dtype == layer.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


FLAT_DECODE_SLOTS = 4096  # a layer of at most this many slots decodes in one product over all of them


def _per_head_decode(layer, query: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode query (1, H_q, 1, d) over a non-uniform fp32 CPU layer -> (1, 1, H_q, d_v).

    Head h: ``softmax(s * q_h K_h^T + beta_h) V_h`` as matrix products. On a CPU, SDPA's kernel splits
    its work by (head, query block): one KV head's (rep, L) problem is one work item on one thread,
    while a product uses every thread. A layer of up to :data:`FLAT_DECODE_SLOTS` slots (N, up to
    the last head's last entry) is one product of all H_q queries over all N slots, with padding
    and the other heads' slots hidden by
    :meth:`~agentmem.kv.layer.CacheLayer.owner_bias`: H_kv times the multiply-adds, but four calls
    instead of three per head and the same bytes read. Measured inside decoding on a 2-core CPU
    (per layer call): 188 against 240 us over layers of ~1,300-2,400 slots, 279 against 285 at
    ~2,400-4,500, where reading K and V dominates; beyond ~4k slots the loop over heads is faster.
    """
    _, hq, _, d = query.shape
    hkv = layer.num_heads
    rep = hq // hkv
    n = layer.used_slots  # the last head's padding is left out
    if n <= FLAT_DECODE_SLOTS:
        bias = torch.add(layer.owner_bias()[..., :n].expand(hkv, rep, n), layer.beta[:n]).view(hq, n)  # (H_q, N)
        scores = torch.addmm(bias, query.reshape(hq, d), layer.k[:n].t(), alpha=scale)  # (H_q, N)
        return torch.mm(torch.softmax(scores, dim=-1), layer.v[:n]).view(1, 1, hq, -1)
    q = query.reshape(hkv, rep, d)  # (H_kv, rep, d)
    out = query.new_empty(hkv, rep, layer.v_head_dim)
    for h in range(hkv):
        length = layer.lengths[h]
        k, v, beta = layer.run(h)
        if layer.has_beta:
            scores = torch.addmm(beta[None, :length], q[h], k[:length].t(), alpha=scale)  # (rep, L)
        else:
            scores = torch.mm(q[h], k[:length].t()).mul_(scale)
        torch.mm(torch.softmax(scores, dim=-1), v[:length], out=out[h])
    return out.view(1, 1, hq, -1)


AttentionInterface.register(NAME, agentmem_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model: torch.nn.Module) -> None:
    """Switch a loaded transformers model to agentmem attention (works with any cache as before)."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise UnsupportedModelError(f"{type(model).__name__} does not accept a custom attention implementation")
