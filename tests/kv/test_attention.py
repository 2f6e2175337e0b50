"""Semantics of the beta-aware attention: bias, eviction, padding, sliding windows."""

from __future__ import annotations

import math

import torch

from agentmem import AgentSession
from agentmem.kv.layer import Block
from tests.helpers import TEXT, read_all, reference_logits


def test_evicting_keys_equals_masked_recompute(tiny, tokenizer):
    ref, loaded = tiny
    ids = tokenizer(TEXT * 2)["input_ids"]
    prefix, new = ids[:30], ids[30:36]
    evicted = range(5, 13)
    session = AgentSession(model=loaded, max_kv_mb=None)
    read_all(session, prefix)
    for layer in range(len(session.cache.layers)):
        if session.cache.layers[layer].max_length >= 13:  # sliding layers hold all 30 here (window 16 > trim batch)
            session.cache.evict_all_heads(layer, 5, 13)
    got = session.engine.run(session.cache, new, "all", None)
    hidden = {(q, k) for q in range(30, 36) for k in evicted}
    expected = reference_logits(ref, prefix + new, hidden)[30:]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def _insert_copies(layer, slot: int, copies: int) -> None:
    layer.resize(layer.capacity + copies + 16)  # uniform
    for h in range(layer.num_heads):
        one = layer.read_span(h, slot, slot + 1)
        block = Block(
            *(t.repeat(copies + 1, *([1] * (t.dim() - 1))) for t in (one.keys, one.values, one.beta, one.pos, one.tok))
        )
        layer.write_head(h, slot, slot + 1, block)
    layer.refresh_meta()


def test_beta_log_k_equals_k_copies(tiny, tokenizer):
    _, loaded = tiny
    ids = tokenizer(TEXT)["input_ids"]
    prefix, new = ids[:12], ids[12:16]  # inside the tiny Gemma's 16-token window
    a = AgentSession(model=loaded, max_kv_mb=None)
    b = AgentSession(model=loaded, max_kv_mb=None)
    read_all(a, prefix)
    read_all(b, prefix)
    slot, k = 3, 3
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.grid("beta", slot + 1)[:, slot] = math.log(k)
        la.refresh_meta()
        _insert_copies(lb, slot, k - 1)
    assert all(layer.has_bias for layer in a.cache.layers)
    got = a.engine.run(a.cache, new, "all", None)
    expected = b.engine.run(b.cache, new, "all", None)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_uneven_heads_padding_is_invisible(tiny_llama, tokenizer):
    """Deleting a key from one head only == that head not seeing it (others unaffected)."""
    ref, loaded = tiny_llama
    ids = tokenizer(TEXT * 2)["input_ids"]
    prefix, new = ids[:24], ids[24:28]
    a = AgentSession(model=loaded, max_kv_mb=None)
    read_all(a, prefix)
    cache = a.cache
    for idx, layer in enumerate(cache.layers):
        spans = [[(4, 9, None)], []]  # head 0 loses 5 keys, head 1 keeps all
        cache.replace_spans(idx, spans)
        assert layer.lengths == [19, 24] and layer.has_bias
        assert torch.isinf(layer.head("beta", 0)[19:24]).all()
    got = a.engine.run(cache, new, "all", None)
    # reference: the same effect through beta = -inf on the evicted keys of head 0 in an untouched cache
    b = AgentSession(model=loaded, max_kv_mb=None)
    read_all(b, prefix)
    for layer in b.cache.layers:
        layer.head("beta", 0)[4:9] = -math.inf
        layer.refresh_meta()
    expected = b.engine.run(b.cache, new, "all", None)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_decode_and_prefill_paths_agree_with_bias(tiny_llama, tokenizer):
    """A biased cache read one token at a time gives the same logits as one multi-token step."""
    _, loaded = tiny_llama
    ids = tokenizer(TEXT)["input_ids"]
    prefix, new = ids[:16], ids[16:22]
    sessions = [AgentSession(model=loaded, max_kv_mb=None) for _ in range(2)]
    for s in sessions:
        read_all(s, prefix)
        for layer in s.cache.layers:
            layer.grid("beta", 6)[:, 2:6] = torch.linspace(-1.0, 1.0, 4)
            layer.refresh_meta()
    together = sessions[0].engine.run(sessions[0].cache, new, "all", None)
    one_by_one = torch.cat([sessions[1].engine.run(sessions[1].cache, [t], "all", None) for t in new])
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=1e-4)


def test_plain_model_still_works_with_agentmem_attention(tiny_llama, tokenizer):
    """Switching a model to agentmem attention does not change it when used without a session."""
    ref, loaded = tiny_llama
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert (
        loaded.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).tolist()
        == ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).tolist()
    )
