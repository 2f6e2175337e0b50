"""Memory beside the cache: the bound on a compaction's work (``max_work_mb``), a budget that
covers cache + query buffer + work (``budget_covers="all"``) and the undo copies of an operation."""

from __future__ import annotations

import pytest
import torch

from agentmem import AgentSession, BudgetError
from agentmem.models import wrap_model
from agentmem.units import MiB
from tests.helpers import build_tiny, check_invariants, fingerprint

W = "the quick brown fox jumps over the lazy dog "
# context queries (no scratch pass: the bound changes only how the work is batched) and small fit
# units, so that a bound of a few hundred KiB is above the least one layer's compaction holds
CONTEXT = {"name": "am-halve", "offline_queries": "context", "query_buffer": 256, "chunk": 64, "fit_query_cap": 64}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tokenizer):
    return wrap_model(build_tiny("llama", len(tokenizer)), tokenizer, name="tiny-llama")


def _entries(s: AgentSession) -> list[torch.Tensor]:
    out = []
    for layer in s.cache.layers:
        for h, n in enumerate(layer.lengths):
            out += [layer.head(name, h)[:n].float() for name in ("k", "v", "beta", "tok")]
    return out


def test_a_work_bound_changes_how_a_compaction_runs_not_what_it_writes(llama):
    free = AgentSession(model=llama, max_kv_mb=None, policy=CONTEXT)
    bound = AgentSession(model=llama, max_kv_mb=None, policy=CONTEXT, max_work_mb=0.2)
    for s in (free, bound):
        s.append(W * 45)
    a, b = free.compact(0.5), bound.compact(0.5)
    assert b.work_limit == int(0.2 * MiB) and a.work_limit is None
    assert b.work_bytes <= b.work_limit < a.work_bytes, (a.work_bytes, b.work_bytes)
    assert any("layer groups" in n for n in b.notes), b.notes  # the layers were written group by group
    assert free.stats.physical_tokens == bound.stats.physical_tokens
    for x, y in zip(_entries(free), _entries(bound), strict=True):  # the same keys kept, fits to float noise
        torch.testing.assert_close(x, y, atol=2e-3, rtol=2e-3)
    assert b.fit_output_error == pytest.approx(a.fit_output_error, rel=1e-3)
    assert bound.stats.peak_work_bytes == b.work_bytes and bound.stats.max_work_bytes == int(0.2 * MiB)


def test_a_bound_below_one_layers_work_is_reported_not_hidden(llama):
    s = AgentSession(model=llama, max_kv_mb=None, policy=CONTEXT, max_work_mb=0.05)
    s.append(W * 45)
    ev = s.compact(0.5)
    assert ev.work_bytes > ev.work_limit
    assert any("over max_work_mb" in n for n in ev.notes), ev.notes
    check_invariants(s)


def test_a_scratch_pass_shrinks_its_pieces_and_keeps_at_most_half_the_bound_in_queries(tokenizer):
    # deep enough that the queries of a short text, not the pass's attention scratch, meet the bound
    deep = wrap_model(build_tiny("llama", len(tokenizer), num_hidden_layers=24), tokenizer, name="tiny-deep")
    policy = {**CONTEXT, "offline_queries": "repeat-prefill"}
    s = AgentSession(model=deep, max_kv_mb=None, policy=policy, max_work_mb=1.5)
    s.append(W * 45)
    ev = s.compact(0.5)
    assert ev.queries == "repeat-prefill", ev.notes
    capped = [n for n in ev.notes if "repeat-prefill queries capped" in n]
    assert capped, ev.notes
    tokens = int(capped[0].split("capped at ")[1].split()[0])
    assert 16 <= tokens < len(s.transcript_ids)
    assert ev.work_bytes <= ev.work_limit, ev.notes
    free = AgentSession(model=deep, max_kv_mb=None, policy=policy)
    free.append(W * 45)
    assert free.compact(0.5).work_bytes > ev.work_limit  # the bound is what kept it there


def test_a_failure_in_a_later_layer_group_leaves_the_cache_as_it_was(llama, monkeypatch):
    from agentmem.compaction import am

    s = AgentSession(model=llama, max_kv_mb=None, policy=CONTEXT, max_work_mb=0.2)
    s.append(W * 45)
    before = fingerprint(s)
    calls = []
    real = am.AttentionMatching.compact_all

    def fail_second(self, cache, requests, queries, report):
        calls.append(len(requests))
        if len(calls) == 2:  # the first group is already written when the second fails
            raise FloatingPointError("injected")
        return real(self, cache, requests, queries, report)

    monkeypatch.setattr(am.AttentionMatching, "compact_all", fail_second)
    with pytest.raises(Exception, match="injected"):
        s.compact(0.5)
    assert len(calls) == 2
    assert fingerprint(s) == before
    check_invariants(s)


def test_a_budget_that_covers_all_bounds_cache_query_buffer_and_work_together(llama):
    budget = 1.0
    policy = {**CONTEXT, "queries": "recent", "query_buffer": 32}
    s = AgentSession(model=llama, max_kv_mb=budget, policy=policy, budget_covers="all")
    st = s.stats
    assert st.budget_bytes == int(budget * MiB) and st.budget_covers == "all"
    assert st.max_kv_bytes + st.query_buffer_bytes + st.max_work_bytes <= st.budget_bytes
    assert st.max_work_bytes >= st.max_kv_bytes // 2 - 1
    s.append(W * 200)
    s.generate(" the", max_new_tokens=40)
    st = s.stats
    assert st.compactions, "the budget filled"
    assert st.peak_kv_bytes <= st.max_kv_bytes
    assert all(e.work_bytes <= st.max_work_bytes for e in st.compactions), [e.notes for e in st.compactions]
    assert st.peak_kv_bytes + st.query_buffer_bytes + st.peak_work_bytes <= st.budget_bytes
    check_invariants(s)


def test_budget_covers_all_refuses_what_it_cannot_cover(llama):
    with pytest.raises(BudgetError, match="query buffer"):
        AgentSession(model=llama, max_kv_mb=0.1, policy=CONTEXT, budget_covers="all")  # its buffer is 0.19 MiB
    with pytest.raises(BudgetError, match="needs a max_kv_mb"):
        AgentSession(model=llama, max_kv_mb=None, budget_covers="all")
    with pytest.raises(ValueError, match="budget_covers"):
        AgentSession(model=llama, max_kv_mb=1, budget_covers="everything")
    with pytest.raises(BudgetError, match="max_work_mb"):
        AgentSession(model=llama, max_kv_mb=1, max_work_mb=0)
    small = AgentSession(model=llama, max_kv_mb=0.3, policy={**CONTEXT, "query_buffer": 8}, budget_covers="all")
    small.append(W * 30)
    before = fingerprint(small)
    with pytest.raises(BudgetError, match="cache gets"):  # a bigger query buffer leaves the full cache no room
        small.policy = {**CONTEXT, "query_buffer": 128}
    assert fingerprint(small) == before
    check_invariants(small)


def test_an_operation_keeps_its_undo_copies_in_host_memory_and_counts_them(llama):
    s = AgentSession(model=llama, max_kv_mb=0.06, policy="am-halve")
    assert s.stats.peak_undo_bytes == 0 and s.stats.undo_device == "cpu"
    s.append(W * 20)
    assert s.compactions
    assert 0 < s.stats.peak_undo_bytes <= s.stats.max_kv_bytes  # a copy of each layer compacted, once per operation


def test_the_work_bound_and_what_the_budget_covers_survive_save_and_load(llama, tmp_path):
    s = AgentSession(model=llama, max_kv_mb=1.0, policy={**CONTEXT, "query_buffer": 32}, budget_covers="all")
    s.append(W * 10)
    path = s.save(tmp_path / "s.agentmem")
    t = AgentSession.load(path, model=llama)
    assert (t.stats.budget_covers, t.stats.max_work_bytes, t.stats.max_kv_bytes) == (
        "all",
        s.stats.max_work_bytes,
        s.stats.max_kv_bytes,
    )
    u = AgentSession.load(path, model=llama, budget_covers="kv", max_work_mb=0.5)
    assert (u.stats.max_kv_bytes, u.stats.max_work_bytes) == (int(1.0 * MiB), int(0.5 * MiB))


def test_a_bf16_query_buffer_takes_half_the_memory_and_still_fits(llama, tmp_path):
    fp32 = AgentSession(model=llama, max_kv_mb=0.06, policy="am-halve")
    half = AgentSession(model=llama, max_kv_mb=0.06, policy={"name": "am-halve", "query_buffer_dtype": "bfloat16"})
    for s in (fp32, half):
        s.append(W * 20)
    assert half.cache.query_buffer.data.dtype == torch.bfloat16
    assert half.stats.query_buffer_bytes * 2 == fp32.stats.query_buffer_bytes
    a = [e for e in fp32.compactions if e.method == "am"]
    b = [e for e in half.compactions if e.method == "am"]
    assert a and len(a) == len(b)
    assert b[-1].fit_output_error == pytest.approx(a[-1].fit_output_error, rel=0.2, abs=0.01)
    check_invariants(half)
    half.policy = "am-halve"  # back to the model's dtype: the rows come along
    assert half.cache.query_buffer.data.dtype == torch.float32 and any(half.cache.query_buffer.filled)
    t = AgentSession.load(half.save(tmp_path / "h.agentmem"), model=llama)
    assert fingerprint(t) == fingerprint(half)


def test_a_policy_switch_under_budget_covers_all_keeps_the_cache_in_its_new_share(llama):
    s = AgentSession(model=llama, max_kv_mb=1.0, policy="streaming", budget_covers="all")
    s.append(W * 60)
    before = fingerprint(s)
    with pytest.raises(BudgetError, match="cache gets"):  # 0.53 MiB held, 0.47 would be left: refused as it was
        s.policy = {"name": "am-halve", "query_buffer": 400}
    assert fingerprint(s) == before and s.stats.max_kv_bytes > s.cache.kv_bytes
    s = AgentSession(model=llama, max_kv_mb=1.0, policy="streaming", budget_covers="all")
    s.append(W * 20)
    s.policy = {"name": "am-halve", "query_buffer": 400}  # a bigger buffer: a smaller share for the cache
    st = s.stats
    assert st.max_kv_bytes + st.query_buffer_bytes + st.max_work_bytes <= st.budget_bytes
    assert st.kv_bytes <= st.max_kv_bytes and s.cache.fits(1)
    assert s.engine.chunk_tokens <= s.cache.max_tokens() // 4
    s.generate(" the", max_new_tokens=20)
    check_invariants(s)


def test_compact_gives_the_heap_it_freed_back_once_it_completes(llama, monkeypatch):
    """compact() returns freed heap pages to the system after it commits (glibc's malloc_trim on
    Linux), and not when it fails; the call itself runs here (Linux, glibc)."""
    import sys

    import agentmem.session as session_module
    from agentmem.heap import release_freed_memory

    if sys.platform.startswith("linux"):
        assert release_freed_memory() is True
    calls = []
    monkeypatch.setattr(session_module, "release_freed_memory", lambda: calls.append(1) or True)
    s = AgentSession(model=llama, max_kv_mb=None, policy=CONTEXT)
    s.append(W * 20)
    assert s.compact(0.5) is not None and calls == [1]

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(s.engine, "compact", boom)
    with pytest.raises(RuntimeError, match="injected"):
        s.compact(0.5)
    assert calls == [1]
