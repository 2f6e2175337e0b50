"""ModelSpec: what the cache, the attention path and the compaction methods need to know about a model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ModelSpec:
    """What the cache and the attention path need to know about a loaded model.

    ``inv_freq[l]`` holds layer l's RoPE inverse frequencies (fp32, rotary_dim/2); ``sliding_window[l]``
    is None for global layers; ``scaling[l]`` is the softmax scale the layer really uses.
    """

    name: str
    model_type: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    sliding_window: tuple[int | None, ...]
    scaling: tuple[float, ...]
    inv_freq: tuple[torch.Tensor, ...] = field(repr=False, compare=False)
    rope_rotatable: bool
    max_position_embeddings: int
    config_hash: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
