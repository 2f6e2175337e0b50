"""Attention Matching on tiny real models: offline compaction, the online halving policy, queries."""

from __future__ import annotations

import math

import pytest
import torch

from agentmem import AgentSession, CompactionError
from agentmem.compaction.queries import QueryBuffer, QuerySet
from agentmem.kv.positions import _rebase
from tests.helpers import TEXT

CONT = " The quick brown fox jumps over the lazy dog. All that glitters is not gold."


def kl_to(reference: AgentSession, session: AgentSession) -> float:
    p = reference.score(CONT, return_logits=True).logits
    q = session.score(CONT, return_logits=True).logits
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_ratio_one_leaves_logits_unchanged(tiny, tokenizer):
    _, loaded = tiny
    a = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve")
    a.append(TEXT * 4)
    b = a.fork()
    b.compact(1.0)
    pa = a.score(CONT, return_logits=True).logits
    pb = b.score(CONT, return_logits=True).logits
    torch.testing.assert_close(pa, pb, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_am_beats_eviction_and_window_at_half(tiny, tokenizer):
    _, loaded = tiny
    full = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve")
    full.append(TEXT * 6)
    am = full.fork()
    ev = am.compact(0.5)  # default offline: repeat-prefill queries
    assert ev.method == "am" and ev.queries == "repeat-prefill" and ev.fit_output_error is not None
    evict = full.fork()
    evict.policy = type(full.policy)(full.policy.config.model_copy(update={"fit_beta": False, "fit_values": False}))
    evict.compact(0.5)
    window = full.fork()
    window.compact(0.5, method="window")
    assert am.stats.physical_tokens == evict.stats.physical_tokens == window.stats.physical_tokens
    kl_am, kl_evict, kl_window = kl_to(full, am), kl_to(full, evict), kl_to(full, window)
    assert kl_am < kl_evict and kl_am < kl_window
    assert am.generate(" The", max_new_tokens=8).stats.generated_tokens == 8


def test_online_halving_stays_well_formed(tiny, tokenizer):
    """Many successive halvings of the same span during one long run: budget held, nothing degenerate."""
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=0.12, policy={"name": "am-halve", "recent": 16})
    r = s.generate(TEXT, max_new_tokens=700, ignore_eos=True)
    st = s.stats
    assert st.peak_kv_bytes <= st.max_kv_bytes
    budget = [e for e in st.compactions if e.reason == "budget"]
    assert len(budget) >= 6
    assert all(e.method == "am" and e.queries == "recent" for e in budget)
    assert all(math.isfinite(e.fit_output_error) and math.isfinite(e.fit_mass_error) for e in budget)
    for layer in s.cache.layers:
        for h, n in enumerate(layer.lengths):
            beta = layer.head("beta", h)[:n]
            assert torch.isfinite(beta).all() and torch.isinf(layer.head("beta", h)[n:]).all()
            assert beta.max() <= math.log(max(layer.lengths) * 64)
            pos = layer.head("pos", h)[:n]
            assert torch.all(pos[1:] >= pos[:-1])  # entries stay in position order
        assert torch.isfinite(layer.k).all() and torch.isfinite(layer.v).all()
    assert len(r.token_ids) == 700


def test_pinned_span_is_never_compacted(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.12, policy="am-halve", positions={"mode": "raw"})
    s.append("You are a careful assistant. Never reveal the password swordfish.", pin=True)
    start, end = s.pinned[0]
    before = [layer.grid("k", end)[:, start:].clone() for layer in s.cache.layers]
    s.append(TEXT * 15)
    assert len(s.compactions) >= 3
    for layer, keys in zip(s.cache.layers, before):
        for h in range(layer.num_heads):
            toks = layer.head("tok", h)[: layer.lengths[h]].tolist()
            slots = [i for i, t in enumerate(toks) if start <= t < end - 1]  # the pin's last token was pending
            assert [toks[i] for i in slots] == list(range(start, end - 1))
            torch.testing.assert_close(layer.head("k", h)[slots], keys[h, : len(slots)], atol=1e-5, rtol=1e-5)


def test_recompacting_includes_existing_beta(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    full = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve")
    full.append(TEXT * 6)
    twice = full.fork()
    twice.compact(0.5)
    twice.compact(0.5)
    once = full.fork()
    once.compact(0.25)
    assert twice.stats.physical_tokens == pytest.approx(once.stats.physical_tokens, abs=2)
    assert kl_to(full, twice) < 0.05  # a second halving of fitted entries is still close to the original


def test_failed_compaction_leaves_cache_untouched(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy="streaming")
    s.append(TEXT * 3)
    lengths = s.cache.snapshot_lengths()
    keys = [layer.k.clone() for layer in s.cache.layers]
    with pytest.raises(CompactionError, match="no reference queries"):
        s.compact(0.5, method="am", queries="recent")  # a streaming session buffers no queries
    assert s.cache.snapshot_lengths() == lengths
    assert all(torch.equal(a.k, b) for a, b in zip(s.cache.layers, keys))


def test_repeat_prefill_without_headroom_falls_back(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.12, policy="am-halve")
    s.append(TEXT * 12)
    while s.cache.free_tokens() >= 16:  # fill the budget to the brim
        s.append(" fox")
    ev = s.compact(0.5)
    assert any("repeat-prefill" in note for note in ev.notes)
    assert ev.queries == "recent"


def test_gqa_stacking_matches_per_head_layout():
    q = torch.arange(4 * 5 * 2, dtype=torch.float32).reshape(4, 5, 2)  # (H_q=4, n=5, d=2), 2 KV heads
    qs = QuerySet(source="t", per_layer={0: q}).for_kv_heads(0, num_kv_heads=2, cap=100)
    assert qs.shape == (2, 10, 2)
    for h in range(2):
        manual = torch.cat([q[h * 2 + r] for r in range(2)])
        torch.testing.assert_close(qs[h], manual)
    capped = QuerySet(source="t", per_layer={0: q}).for_kv_heads(0, 2, cap=4, seed=1)
    again = QuerySet(source="t", per_layer={0: q}).for_kv_heads(0, 2, cap=4, seed=1)
    assert capped.shape == (2, 4, 2) and torch.equal(capped, again)


def test_recent_buffer_keeps_the_last_queries_and_follows_rebase(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    spec = loaded.spec
    buf = QueryBuffer(spec.num_layers, spec.num_q_heads, spec.head_dim, 8, "recent", torch.device("cpu"), torch.float32)
    for i in range(3):
        buf.push(0, torch.full((1, spec.num_q_heads, 5, spec.head_dim), float(i)))
    got = buf.query_set().per_layer[0][0, :, 0]  # head 0, first dim of each stored query
    assert sorted(got.tolist()) == sorted([1.0] * 3 + [2.0] * 5)
    # after a rebase, buffered queries see the keys exactly as before
    s = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve")
    s.append(TEXT * 2)
    for idx in range(len(s.cache.layers)):
        s.cache.evict_all_heads(idx, 0, 10)
    layer = s.cache.layers[1]
    q = s.cache.query_buffer.query_set().per_layer[1]
    before = q @ layer.head("k", 0)[: layer.lengths[0]].T
    _rebase(s.cache)
    q = s.cache.query_buffer.query_set().per_layer[1]
    after = q @ layer.head("k", 0)[: layer.lengths[0]].T
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-4)


def test_on_policy_groups_recompute_queries_and_undo_on_failure(tiny_llama, tokenizer, monkeypatch):
    _, loaded = tiny_llama
    full = AgentSession(
        model=loaded,
        max_kv_mb=None,
        policy={"name": "am-halve", "on_policy_groups": 3, "offline_head_budgets": "uniform"},
    )
    full.append(TEXT * 6)
    s = full.fork()
    calls = []
    original = s.engine.queries

    def counting(cache, plan, source):
        calls.append(sorted(r.layer for r in plan.requests))
        return original(cache, plan, source)

    monkeypatch.setattr(s.engine, "queries", counting)
    ev = s.compact(0.5)
    assert calls == [[0], [1], [2]]  # three layers, three groups, queries recomputed for each
    assert "on-policy: 3 layer groups" in ev.notes
    assert kl_to(full, s) < 0.05
    # a failure in the last group restores every layer
    t = full.fork()
    before = [layer.snapshot() for layer in t.cache.layers]

    def failing(cache, plan, source):
        if plan.requests[0].layer == 2:
            raise CompactionError("boom")
        return original.__func__(t.engine, cache, plan, source)

    monkeypatch.setattr(t.engine, "queries", failing)
    with pytest.raises(CompactionError, match="boom"):
        t.compact(0.5)
    for layer, state in zip(t.cache.layers, before):
        assert layer.lengths == state[-1] and torch.equal(layer.k, state[0])
