"""Positions for runs that never end: re-basing is exact, clamping bounds every distance."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from agentmem import AgentSession, PositionConfig
from agentmem.kv.positions import _rebase
from agentmem.models import wrap_model
from tests.helpers import TEXT, build_tiny, read_all, twin


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_rebase_leaves_attention_unchanged(tiny, tokenizer):
    _, loaded = tiny
    ids = tokenizer(TEXT * 2)["input_ids"]
    a = AgentSession(model=loaded, max_kv_mb=None)
    read_all(a, ids[:40])
    a.cache.evict_all_heads(0, 0, 0)
    for idx in range(len(a.cache.layers)):  # drop the first 10 entries so the oldest key sits at position 10
        a.cache.evict_all_heads(idx, 0, 10)
    b_cache = a.cache.clone()
    expected = a.engine.run(b_cache, ids[40:44], "all", None)
    delta = _rebase(a.cache)
    assert delta == 10 and a.cache.position_offset == 10 and a.cache.next_position == 30
    got = a.engine.run(a.cache, ids[40:44], "all", None)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "gemma3"])
def test_endless_run_stays_inside_trained_positions(arch_name, tokenizer):
    """max_position_embeddings=128, 700 tokens: positions and distances stay below 128."""
    ref = build_tiny(arch_name, len(tokenizer), max_position_embeddings=128)
    loaded = wrap_model(twin(ref), tokenizer, name=f"tiny-{arch_name}")
    s = AgentSession(model=loaded, max_kv_mb=0.08, positions={"mode": "clamp", "max_distance": 100}, chunk_tokens=8)
    ids = tokenizer(TEXT * 20)["input_ids"][:700]
    for start in range(0, len(ids), 50):
        s.append(tokenizer.decode(ids[start : start + 50]))
        cache = s.cache
        assert cache.next_position <= 128
        for layer in cache.layers:
            if layer.min_pos is not None:
                assert cache.next_position - layer.min_pos <= 100
    assert s.stats.position_offset > 0
    assert s.stats.logical_tokens > 600
    assert s.stats.peak_kv_bytes <= s.max_kv_bytes
    r = s.generate(" and", max_new_tokens=5)
    assert len(r.token_ids) == 5


def test_raw_mode_keeps_original_positions(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.05, positions={"mode": "raw"})
    s.append(TEXT * 10)
    assert s.stats.position_offset == 0
    assert s.cache.next_position == s.stats.logical_tokens


def test_position_config_is_validated():
    with pytest.raises(ValidationError):
        PositionConfig(mode="sideways")
    with pytest.raises(ValidationError):
        PositionConfig(max_distance=8)
    with pytest.raises(ValidationError):
        PositionConfig(bogus=1)
