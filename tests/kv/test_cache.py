"""CompactedCache: byte accounting, growth, atomic edits, rollback, rotation."""

from __future__ import annotations

import math

import pytest
import torch

from agentmem import AgentSession, CompactionError
from agentmem.kv.layer import META_BYTES_PER_SLOT, Block
from tests.helpers import TEXT, layer_state, read_all, same_state, spread, subset, synthetic_cache


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


def _edits(layer) -> list[list[tuple]]:
    """Spans of both heads of a 200-entry layer: deletions, shorter and empty replacements, uneven."""
    return [
        [(0, 10, None), (50, 120, subset(layer, 0, spread(200, 20), torch.linspace(-2, 2, 20))), (150, 160, None)],
        [(5, 200, subset(layer, 1, spread(200, 30))), (0, 2, subset(layer, 1, [0]))],
    ]


def test_copy_on_write_edit_equals_the_in_place_one_and_its_undo_is_the_old_buffers(tiny_llama):
    """Inside an operation, a CPU cache's first edit of a layer is written into new buffers -- the
    same content, lengths, capacities and padding as the in-place edit outside one -- and the old
    buffers, not a copy, are what an abort puts back; the next edit of that layer goes in place,
    and an edit that replaces nothing neither saves nor moves anything."""
    _, loaded = tiny_llama
    plain = synthetic_cache(loaded.spec, 200)
    cow = plain.clone()
    before, old_k = layer_state(cow.layers[1]), cow.layers[1].k
    plain.replace_spans(1, _edits(plain.layers[1]))
    cow.begin()
    cow.replace_spans(1, [[(3, 3, None)], [(0, 0, None)]])  # nothing to replace: nothing saved or moved
    cow.evict_all_heads(2, 7, 7)
    assert cow.layers[1].k is old_k and cow.peak_undo_bytes == 0
    cow.replace_spans(1, _edits(cow.layers[1]))
    assert same_state(layer_state(cow.layers[1]), layer_state(plain.layers[1]))
    assert cow.layers[1].lengths == [200 - 10 - 70 + 20 - 10, 200 - 195 + 30 - 2 + 1]
    assert cow.layers[1].k is not old_k and cow.peak_undo_bytes == before[0][0] * 2 * cow.layers[1].head_slot_bytes()
    new_k = cow.layers[1].k
    cow.evict_all_heads(2, 0, 50)  # a uniform layer's fast path is copy-on-write too
    cow.replace_spans(1, [[(0, 5, None)], [(0, 1, None)]])
    assert cow.layers[1].k is new_k  # already saved: in place
    cow.abort()
    assert cow.layers[1].k is old_k and same_state(layer_state(cow.layers[1]), before)
    assert same_state(layer_state(cow.layers[2]), layer_state(plain.layers[2]))


def test_copy_on_write_edit_that_fails_midway_leaves_the_layer_as_it_was(tiny_llama, monkeypatch):
    """A failure while a layer is written into its new buffers (out of memory, say) puts the old
    buffers back at once: the layer is as it was, before and after the operation's abort."""
    _, loaded = tiny_llama
    cache = synthetic_cache(loaded.spec, 200)
    before, old_k = layer_state(cache.layers[1]), cache.layers[1].k
    calls = []

    def put(self, block, at):
        calls.append(at)
        if len(calls) == 2:
            raise MemoryError("injected")
        return real_put(self, block, at)

    real_put = type(cache.layers[1])._put
    monkeypatch.setattr(type(cache.layers[1]), "_put", put)
    cache.begin()
    with pytest.raises(MemoryError):
        cache.replace_spans(1, _edits(cache.layers[1]))
    assert cache.layers[1].k is old_k and same_state(layer_state(cache.layers[1]), before)
    cache.abort()
    assert cache.layers[1].k is old_k and same_state(layer_state(cache.layers[1]), before)


def test_copy_on_write_inside_releasing_sizes_layers_as_shrink_to_fit_would(tiny_llama):
    """Inside ``releasing(spare, uneven_only)`` a copy-on-write edit allocates the capacities the
    matching shrink_to_fit gives the in-place edit afterwards (which then has nothing to do), and an
    even layer keeps its own when only uneven ones are released."""
    _, loaded = tiny_llama
    plain = synthetic_cache(loaded.spec, 200)
    cow = plain.clone()
    for spare, uneven_only in ((8, True), (0, False)):
        for cache in (plain, cow):  # plain: no operation open, so its edits go in place
            if cache is cow:
                cache.begin()
            with cache.releasing(spare, uneven_only):
                cache.replace_spans(0, _edits(cache.layers[0]))
                cache.evict_all_heads(2, 0, 120)
            if cache is cow:
                cache.commit()
        plain.shrink_to_fit(spare, uneven_only)  # its layers were edited in place: only now released
        for a, b in zip(plain.layers, cow.layers):
            assert same_state(layer_state(a), layer_state(b))
        caps = [layer.caps for layer in cow.layers]
        cow.shrink_to_fit(spare, uneven_only)
        assert [layer.caps for layer in cow.layers] == caps
        plain, cow = synthetic_cache(loaded.spec, 200), synthetic_cache(loaded.spec, 200)


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
