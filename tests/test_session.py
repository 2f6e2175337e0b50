"""AgentSession on tiny models: budget, events, scoring, chat, compaction on demand, bad input."""

from __future__ import annotations

import pytest
import torch

from agentmem import AgentSession, BudgetError, ModelNotFoundError, UnknownPolicyError
from tests.helpers import TEXT


def test_generation_under_budget_compacts_and_keeps_going(tiny, tokenizer):
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=0.06, policy="streaming")
    peaks = []
    compactions = 0
    for ev in s.stream(TEXT, max_new_tokens=300):
        peaks.append(s.cache.kv_bytes)
        compactions += ev.kind == "compaction"
    st = s.stats
    assert max(peaks) <= st.max_kv_bytes and st.peak_kv_bytes <= st.max_kv_bytes
    assert compactions >= 3 and len(st.compactions) == compactions
    assert st.logical_tokens > 3 * st.physical_tokens
    assert all(e.tokens_after < e.tokens_before for e in st.compactions)
    assert st.compactions[0].reason == "budget" and st.compactions[0].method == "window"


@pytest.mark.parametrize("policy", ["streaming", "am-halve"])
def test_long_input_is_ingested_within_budget(tiny, tokenizer, policy):
    _, loaded = tiny
    s = AgentSession(model=loaded, max_kv_mb=0.06, policy=policy)
    s.append(TEXT * 40)  # ~1,600 tokens into a ~40-token budget
    st = s.stats
    assert st.peak_kv_bytes <= st.max_kv_bytes
    assert st.logical_tokens > 1500 and len(st.compactions) > 10
    assert s.generate(" The", max_new_tokens=4).stats.generated_tokens == 4


def test_sinks_survive_compaction(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.06, policy="streaming")
    s.append(TEXT * 10)
    for layer in s.cache.layers:
        assert layer.grid("tok", 4).tolist() == [[0, 1, 2, 3]] * layer.num_heads
        recent = layer.head("tok", 0)[4 : layer.lengths[0]]
        assert torch.all(recent[1:] == recent[:-1] + 1)  # one contiguous recent window
        assert int(recent[-1]) == s.stats.logical_tokens - 1


def test_score_does_not_change_the_session(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT)
    before = s.cache.clone()
    nll = s.score(" All that glitters is not gold.")
    nll2 = s.score(" All that glitters is not gold.")
    assert nll.tokens > 3 and nll.nll == pytest.approx(nll2.nll, abs=1e-6)
    assert s.cache.snapshot_lengths() == before.snapshot_lengths()
    assert s.cache.logical_length == before.logical_length
    # the next-token distribution is exactly what it was
    a = s.engine.run(s.cache.clone(), s.engine.pending, "last", None)
    b = s.engine.run(before, s.engine.pending, "last", None)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_score_matches_a_direct_forward(tiny_llama, tokenizer):
    ref, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    prefix, text = "The quick brown fox", " jumps over the lazy dog."
    got = s.score(text, prefix=prefix)
    p_ids, t_ids = tokenizer(prefix)["input_ids"], tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = ref(torch.tensor([p_ids + t_ids])).logits[0]
    want = torch.nn.functional.cross_entropy(logits[len(p_ids) - 1 : -1], torch.tensor(t_ids))
    assert got.nll == pytest.approx(float(want), abs=1e-4)


def test_score_longer_than_budget_uses_a_scratch_copy(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.06, policy="streaming")
    s.append(TEXT)
    lengths, events = s.cache.snapshot_lengths(), len(s.compactions)
    r = s.score(TEXT * 5)
    assert r.tokens > s.cache.max_tokens() and r.nll > 0
    assert s.cache.snapshot_lengths() == lengths and len(s.compactions) == events


def test_stream_events_are_typed(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    events = list(s.stream(TEXT, max_new_tokens=12))
    assert events[-1].kind == "done" and events[-1].result.stats.generated_tokens == 12
    text = "".join(e.text for e in events if e.kind == "token")
    assert text == events[-1].result.text
    assert all(isinstance(e.text, str) for e in events)
    assert tokenizer.decode(events[-1].result.token_ids) == text


def test_stop_strings_and_zero_tokens(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    full = s.generate(TEXT, max_new_tokens=30).text
    stop = full[5:8]
    s2 = AgentSession(model=loaded, max_kv_mb=None)
    r = s2.generate(TEXT, max_new_tokens=30, stop=[stop])
    assert r.finish_reason == "stop" and r.text == full[: full.index(stop)]
    r0 = s2.generate(" x", max_new_tokens=0)
    assert r0.token_ids == [] and r0.finish_reason == "length"


def test_sampling_is_seeded(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    outs = [
        AgentSession(model=loaded, max_kv_mb=None, seed=7).generate(TEXT, 20, temperature=1.0, top_p=0.9)
        for _ in range(2)
    ]
    assert outs[0].token_ids == outs[1].token_ids


def test_chat_uses_the_template_incrementally(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.chat("Hello!", max_new_tokens=5)
    second = s.chat([{"role": "user", "content": "Again?"}], max_new_tokens=5)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    rendered = tokenizer.apply_chat_template(s.messages[:3], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system")
    # what the model read is exactly the rendered conversation, then its own second reply
    assert s.transcript() == rendered + tokenizer.decode(second.token_ids)
    assert s.stats.logical_tokens + s.stats.pending_tokens == len(s.transcript_ids)


def test_compact_on_demand(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None, policy="streaming")
    s.append(TEXT * 4)
    before = s.stats.physical_tokens
    ev = s.compact(0.25)
    assert s.stats.physical_tokens == pytest.approx(round(0.25 * before), abs=1)
    assert ev.reason == "manual" and ev.kv_bytes_after <= ev.kv_bytes_before
    assert s.generate(" and", max_new_tokens=3).stats.generated_tokens == 3


def test_bad_input_is_a_clear_error_and_the_session_survives(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    with pytest.raises(BudgetError, match="use max_kv_mb >="):
        AgentSession(model=loaded, max_kv_mb=0.001)
    with pytest.raises(BudgetError, match="> 0"):
        AgentSession(model=loaded, max_kv_mb=0)
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        AgentSession(model="/no/such/model", max_kv_mb=1)
    with pytest.raises(UnknownPolicyError, match="known policies: am-halve, h2o, kvzip, snapkv, streaming, truncate"):
        AgentSession(model=loaded, max_kv_mb=1, policy="magic")
    s = AgentSession(model=loaded, max_kv_mb=None)
    with pytest.raises(ValueError, match="nothing to continue"):
        s.generate(None)
    s.append(TEXT)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.generate("x", max_new_tokens=-1)
    with pytest.raises(ValueError, match="prompt is empty"):
        s.generate("")
    with pytest.raises(ValueError, match="ratio"):
        s.compact(0)
    with pytest.raises(ValueError, match="temperature"):
        s.generate("x", temperature=-1)
    with pytest.raises(TypeError):
        s.append(None)
    with pytest.raises(ValueError, match="role"):
        s.chat([{"content": "no role"}])
    assert s.stats.logical_tokens == len(tokenizer(TEXT)["input_ids"]) - 1
    assert s.generate(" The", max_new_tokens=3).stats.generated_tokens == 3


def test_truncate_policy_keeps_no_sinks(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.06, policy="truncate")
    s.append(TEXT * 10)
    assert int(s.cache.layers[0].head("tok", 0)[0]) > 10


def test_presets_and_custom_sampling_hook(tiny_llama, tokenizer):
    from agentmem.policy.presets import available_presets

    _, loaded = tiny_llama
    assert {"am-fast", "am-quality", "streaming-wide"} <= set(available_presets())
    s = AgentSession(model=loaded, max_kv_mb=None, policy="am-quality")
    assert s.policy.config.on_policy_groups == 3
    s.append(TEXT)
    greedy = AgentSession(model=loaded, max_kv_mb=None).generate(TEXT, max_new_tokens=5).token_ids
    picked = []
    for _ in range(5):
        logits = s.next_logits()
        picked.append(int(logits.argmax()))
        s.append_tokens(picked[-1:])
    assert picked == greedy
    with pytest.raises(ValueError, match="token ids"):
        s.append_tokens([10**9])


def test_score_inside_an_open_stream_is_refused_and_a_fork_there_is_free(tiny_llama):
    from agentmem import AgentMemError

    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT)
    events = s.stream(None, max_new_tokens=20)
    next(events)
    before = list(s.transcript_ids)
    with pytest.raises(AgentMemError, match="score"):
        s.score("and then")
    assert list(s.transcript_ids) == before
    f = s.fork()  # taken inside the stream's operation, but not part of it
    n = len(f.transcript_ids)
    with pytest.raises(RuntimeError), f.transaction():
        f.append(" more text")
        raise RuntimeError("undo")
    assert len(f.transcript_ids) == n
    events.close()
    assert s.score("and then").tokens > 0


def test_a_reply_cut_by_a_stop_string_is_still_continued_by_the_next_turn(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    first = s.chat("Say hello.", max_new_tokens=30)
    cut = first.text[len(first.text) // 2 :].strip()[:3]
    assert cut  # a piece of the reply to stop at
    s2 = AgentSession(model=loaded, max_kv_mb=None)
    r = s2.chat("Say hello.", max_new_tokens=30, stop=cut)
    assert r.finish_reason == "stop" and s2.messages[-1]["content"] == r.text
    s2.chat("And again?", max_new_tokens=3)
    # the second turn continues the conversation (one system line), not a fresh rendering of the turn alone
    assert s2.chat_text.count("<|im_start|>system") == 1 and s2.chat_text.count("<|im_start|>user") == 2
    assert s2.transcript().count("<|im_start|>system") == 1
