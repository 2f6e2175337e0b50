"""Eviction baselines (H2O, SnapKV, KVzip, streaming, truncate) under the policy interface."""

from __future__ import annotations

import math

import pytest
import torch

from agentmem import AgentSession
from agentmem.compaction.methods import make_method
from agentmem.compaction.plan import CompactionReport, SpanRequest
from agentmem.compaction.queries import QuerySet
from agentmem.compaction.scores import entry_scores
from agentmem.errors import UnknownPolicyError
from agentmem.policy.presets import resolve_policy
from tests.helpers import TEXT

BASELINES = ["h2o", "snapkv", "kvzip", "streaming", "truncate"]


@pytest.mark.parametrize("name", BASELINES)
def test_online_baseline_holds_the_budget(tiny, tokenizer, name):
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=0.12, policy=name)
    r = s.generate(TEXT, max_new_tokens=400, ignore_eos=True)
    st = s.stats
    assert len(r.token_ids) == 400 and st.peak_kv_bytes <= st.max_kv_bytes
    budget = [e for e in st.compactions if e.reason == "budget"]
    assert budget and all(e.policy == name for e in budget)
    assert all(e.tokens_after < e.tokens_before for e in budget)
    logits = s.next_logits()
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["h2o", "snapkv", "kvzip", "truncate"])
def test_offline_baseline_keeps_the_ratio(tiny_llama, tokenizer, name):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy=name)
    s.append(TEXT * 6)
    before = [list(layer.lengths) for layer in s.cache.layers]
    total_before = sum(map(sum, before))
    ev = s.compact(0.25)
    assert ev.method == make_method(resolve_policy(name).method.name).name and ev.policy == name
    after = [list(layer.lengths) for layer in s.cache.layers]
    if name == "kvzip":  # global budgets: the total is kept, heads may differ
        assert abs(sum(map(sum, after)) - round(0.25 * total_before)) <= len(after) * len(after[0])
    else:
        assert after == [[round(0.25 * n) for n in heads] for heads in before]
    assert torch.isfinite(s.next_logits()).all()


def test_compact_by_policy_name_on_another_session(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy="am-halve")
    s.append(TEXT * 4)
    ev = s.compact(0.5, method="snapkv")
    assert ev.policy == "snapkv" and ev.method == "snapkv"
    with pytest.raises(UnknownPolicyError, match="unknown policy"):
        s.compact(0.5, method="nope")


def test_h2o_scores_are_causal_accumulated_attention(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy="h2o")
    s.append(TEXT * 2)
    layer_idx, h = 1, 0
    qs = s.cache.query_buffer.query_set()
    layer = s.cache.layers[layer_idx]
    q = qs.for_kv_heads(layer_idx, layer.num_heads, 10**6)[h]
    q_pos = qs.positions_for_kv_heads(layer_idx, layer.num_heads, 10**6)
    got = entry_scores(s.cache, layer_idx, h, q, reduce="sum", q_pos=q_pos)
    n = layer.lengths[h]
    k, kpos = layer.head("k", h)[:n].double(), layer.head("pos", h)[:n].long()
    want = torch.zeros(n, dtype=torch.float64)
    for row, p in zip(q.double(), q_pos.tolist()):  # one query at a time, by the definition
        seen = kpos <= p
        w = torch.softmax((k[seen] @ row) * s.spec.scaling[layer_idx], dim=0)
        want[seen] += w
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert q_pos.max() == s.cache.next_position - 1  # every query read so far, at its position


def test_scored_eviction_keeps_the_top_entries_and_the_newest(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy="h2o")
    s.append(TEXT * 2)
    layer_idx = 0
    layer = s.cache.layers[layer_idx]
    n = layer.lengths[0]
    method = make_method("h2o", recent_share=0.5)
    request = SpanRequest(layer_idx, [[(4, n, 20)] for _ in range(layer.num_heads)])
    qs: QuerySet = s.cache.query_buffer.query_set()
    out = method.compact(s.cache, request, qs, CompactionReport())
    q = qs.for_kv_heads(layer_idx, layer.num_heads, 8192)
    q_pos = qs.positions_for_kv_heads(layer_idx, layer.num_heads, 8192)
    for h, [(start, end, block)] in enumerate(out):
        assert (start, end, len(block)) == (4, n, 20)
        scores = entry_scores(s.cache, layer_idx, h, q[h], reduce="sum", q_pos=q_pos)
        top = (torch.topk(scores[4 : n - 10], 10).indices + 4).sort().values
        want = torch.cat([top, torch.arange(n - 10, n)])
        torch.testing.assert_close(block.keys, layer.head("k", h)[want])
        assert torch.equal(block.pos, layer.head("pos", h)[want])


def test_snapkv_pools_and_keeps_its_window(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy={"name": "snapkv", "query_buffer": 8})
    s.append(TEXT * 3)
    s.compact(0.2)
    n_tokens = s.cache.logical_length
    for layer in s.cache.layers:
        for h, n in enumerate(layer.lengths):
            tok = layer.head("tok", h)[:n].tolist()
            assert tok[-8:] == list(range(n_tokens - 8, n_tokens))  # the observation window is kept
            assert tok[:4] == [0, 1, 2, 3]  # sinks


def test_baseline_configs_are_validated(tiny_llama):
    with pytest.raises(UnknownPolicyError, match="invalid settings"):
        resolve_policy({"name": "snapkv", "pool": 0})
    with pytest.raises(UnknownPolicyError, match="invalid settings"):
        resolve_policy({"name": "h2o", "recent_share": 2})
    assert math.isclose(resolve_policy({"name": "h2o", "recent_share": 0.25}).method.recent_share, 0.25)
