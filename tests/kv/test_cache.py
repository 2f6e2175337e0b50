"""CompactedCache: byte accounting, growth, atomic edits, rollback, rotation."""

from __future__ import annotations

import math

import pytest
import torch

from agentmem import AgentSession, CompactionError
from agentmem.kv.layer import META_BYTES_PER_SLOT, Block
from tests.helpers import TEXT, read_all


def held_bytes(cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.k, layer.v, layer.beta, layer.pos, layer.tok)
    )


def test_kv_bytes_counts_every_buffer(tiny, tokenizer):
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT * 3)
    cache = s.cache
    assert cache.kv_bytes == held_bytes(cache)
    spec = loaded.spec
    per_entry = (spec.head_dim + spec.v_head_dim) * 4 + META_BYTES_PER_SLOT
    assert cache.payload_bytes == cache.physical_entries * per_entry
    assert cache.payload_bytes <= cache.kv_bytes
    assert cache.peak_bytes >= cache.kv_bytes


def test_growth_is_amortised(tiny_llama, tokenizer):
    """Appending one token at a time re-allocates O(log n) times, not per token."""
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    layer = s.cache.layers[0]
    caps = set()
    for t in tokenizer(TEXT * 4)["input_ids"][:150]:
        read_all(s, [t])
        caps.add(layer.capacity)
    assert layer.max_length == 150
    assert len(caps) <= 10


def test_budget_bounds_capacity_growth(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.05, policy="streaming")
    limit = s.cache.max_tokens()
    ids = tokenizer(TEXT * 10)["input_ids"]
    s.append(tokenizer.decode(ids))
    assert s.stats.peak_kv_bytes <= s.max_kv_bytes
    assert s.cache.kv_bytes <= s.max_kv_bytes
    assert s.stats.logical_tokens > limit > s.stats.physical_tokens


def test_failed_replacement_leaves_cache_untouched(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    read_all(s, tokenizer(TEXT)["input_ids"][:20])
    cache = s.cache
    before = [(layer.k.clone(), layer.beta.clone(), list(layer.lengths)) for layer in cache.layers]
    d = loaded.spec.head_dim
    bad = Block(torch.full((2, d), math.nan), torch.zeros(2, d), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    good = Block(torch.zeros(2, d), torch.zeros(2, d), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(CompactionError, match="non-finite keys"):
        cache.replace_spans(0, [[(2, 8, good)], [(2, 8, bad)]])
    with pytest.raises(CompactionError, match="outside"):
        cache.validate_spans([(0, [[(2, 8, good)], [(2, 8, good)]]), (1, [[(2, 99, None)], [(0, 0, None)]])])
    with pytest.raises(CompactionError, match="replaces only"):
        cache.replace_spans(0, [[(2, 3, good)], [(2, 8, good)]])
    for layer, (k, beta, lens) in zip(cache.layers, before):
        assert torch.equal(layer.k, k) and torch.equal(layer.beta, beta) and layer.lengths == lens


def test_failed_forward_rolls_back(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT)
    lengths = s.cache.snapshot_lengths()
    logical = s.cache.logical_length

    def boom(layer_idx, query):
        if layer_idx == 2:
            raise RuntimeError("boom")

    s.cache.query_observer = boom
    with pytest.raises(RuntimeError, match="boom"):
        s.generate(" more", max_new_tokens=3)
    s.cache.query_observer = None
    assert s.cache.snapshot_lengths() == lengths and s.cache.logical_length == logical


def test_rotation_round_trip_and_positions(tiny, tokenizer):
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=None)
    read_all(s, tokenizer(TEXT)["input_ids"][:20])
    for idx, layer in enumerate(s.cache.layers):
        k0, p0 = layer.k.clone(), layer.grid("pos", 20).clone()
        delta = torch.randint(-50, 50, (layer.num_heads, layer.max_length))
        layer.rotate(delta, loaded.spec.inv_freq[idx])
        assert torch.equal(layer.grid("pos", 20), p0 + delta.int())
        layer.rotate(-delta, loaded.spec.inv_freq[idx])
        torch.testing.assert_close(layer.k, k0, atol=1e-5, rtol=1e-5)


def test_update_outside_session_is_an_error(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    k = torch.zeros(1, loaded.spec.num_kv_heads, 1, loaded.spec.head_dim)
    with pytest.raises(RuntimeError, match="a session drives it"):
        s.cache.update(k, k, 0)
