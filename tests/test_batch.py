"""Batched decoding of several sessions: each session ends exactly as it would alone."""

from __future__ import annotations

import pytest
import torch

from agentmem import AgentSession
from agentmem.batch import generate_batch
from tests.helpers import TEXT

PROMPTS = [TEXT, "Once upon a time in a land far away", TEXT[40:] * 2, "def add(a, b):\n    return"]


def _memory(s: AgentSession) -> list:
    out = []
    for layer in s.cache.layers:
        out.append((list(layer.lengths), layer.state()[0]))
    return out


def _same(a: AgentSession, b: AgentSession) -> None:
    assert list(a.transcript_ids) == list(b.transcript_ids)
    assert a.engine.pending == b.engine.pending
    assert len(a.compactions) == len(b.compactions)
    assert a.stats.kv_bytes == b.stats.kv_bytes and a.stats.peak_kv_bytes == b.stats.peak_kv_bytes
    for (la, ta), (lb, tb) in zip(_memory(a), _memory(b)):
        assert la == lb
        for name in ("pos", "tok"):
            assert torch.equal(ta[name], tb[name])
        for name in ("k", "v", "beta"):
            torch.testing.assert_close(ta[name], tb[name], rtol=2e-3, atol=2e-3)  # fits amplify float rounding


@pytest.mark.parametrize("policy", ["am-halve", "streaming", "snapkv"])
def test_batch_matches_one_by_one_under_a_budget(tiny, policy):
    _, loaded = tiny
    budget = 0.12
    alone = [AgentSession(model=loaded, max_kv_mb=budget, policy=policy, seed=i) for i in range(len(PROMPTS))]
    together = [AgentSession(model=loaded, max_kv_mb=budget, policy=policy, seed=i) for i in range(len(PROMPTS))]
    lengths = [40, 25, 60, 10]
    expected = [s.generate(p, max_new_tokens=n, ignore_eos=True) for s, p, n in zip(alone, PROMPTS, lengths)]
    got = generate_batch(together, PROMPTS, max_new_tokens=60, ignore_eos=True, stop=None)
    for e, g, n in zip(expected, got, lengths):
        assert g.token_ids[:n] == e.token_ids  # the batch runs 60 tokens for everyone
    assert sum(len(s.compactions) for s in together) > 0
    # and with the same lengths, the sessions end identical
    alone = [AgentSession(model=loaded, max_kv_mb=budget, policy=policy, seed=i) for i in range(len(PROMPTS))]
    for s, p in zip(alone, PROMPTS):
        s.generate(p, max_new_tokens=60, ignore_eos=True)
    for a, b in zip(alone, together):
        _same(a, b)


def test_batch_sampling_chat_and_stop_match(tiny_llama):
    _, loaded = tiny_llama
    loaded.tokenizer.chat_template = loaded.tokenizer.chat_template or None
    kw = dict(max_new_tokens=30, temperature=0.9, top_p=0.9, stop=["\n\n", " the "])
    prompts = ["The fox", [{"role": "user", "content": "hello"}], None]
    alone = [AgentSession(model=loaded, max_kv_mb=0.2, seed=7 + i) for i in range(3)]
    together = [AgentSession(model=loaded, max_kv_mb=0.2, seed=7 + i) for i in range(3)]
    for s in alone + together:
        s.append("Some earlier text. " * 3)
    expected = [alone[0].generate(prompts[0], **kw), alone[1].chat(prompts[1], **kw), alone[2].generate(None, **kw)]
    got = generate_batch(together, prompts, **kw)
    for e, g in zip(expected, got):
        assert (g.token_ids, g.text, g.finish_reason) == (e.token_ids, e.text, e.finish_reason)
    assert together[1].messages == alone[1].messages
    for a, b in zip(alone, together):
        _same(a, b)


def test_batch_refuses_what_it_cannot_do(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    with pytest.raises(ValueError, match="only once"):
        generate_batch([s, s], ["a", "b"])
    with pytest.raises(ValueError, match="2 sessions but 1 prompts"):
        generate_batch([s, AgentSession(model=loaded, max_kv_mb=None)], ["a"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batch([s], ["a"], max_new_tokens=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_batched_prefill_of_one_prompt_under_several_policies(tiny):
    """Rows reading the same number of tokens prefill in one call per chunk, and still end as alone."""
    _, loaded = tiny
    policies = ["am-halve", "snapkv", "streaming", "h2o", "kvzip"]
    prompt = TEXT * 3  # longer than the budget: compactions while reading
    alone = [AgentSession(model=loaded, max_kv_mb=0.12, policy=p) for p in policies]
    together = [AgentSession(model=loaded, max_kv_mb=0.12, policy=p) for p in policies]
    expected = [s.generate(prompt, max_new_tokens=20, ignore_eos=True) for s in alone]
    got = generate_batch(together, [prompt] * len(policies), max_new_tokens=20, ignore_eos=True)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert all(len(s.compactions) > 0 for s in together)
    for a, b in zip(alone, together):
        _same(a, b)
