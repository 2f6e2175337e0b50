"""model.generate over a session's budgeted cache (agentmem.hf.generation): plain transformers code."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from agentmem import AgentSession
from agentmem.hf import generation
from tests.helpers import TEXT

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_generate_matches_plain_transformers_when_nothing_is_compacted(tiny, tokenizer):
    ref, loaded = tiny
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    expected = ref.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    s = AgentSession(model=loaded, max_kv_mb=None)
    with generation(s) as kwargs:
        out = s.model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, **kwargs)
    assert out.tolist() == expected.tolist()
    assert list(s.transcript_ids) == out[0, :-1].tolist()  # the last token is sampled, not yet read
    assert s.cache.logical_length == out.shape[1] - 1


@pytest.mark.parametrize("policy", ["streaming", "am-halve"])
def test_generate_runs_past_the_budget_by_compacting(tiny_llama, tokenizer, policy):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.08, policy=policy)
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with generation(s) as kwargs:
        out = s.model.generate(ids, max_new_tokens=150, min_new_tokens=150, do_sample=False, pad_token_id=0, **kwargs)
    st = s.stats
    assert out.shape[1] == ids.shape[1] + 150 and st.compactions
    assert st.peak_kv_bytes <= st.max_kv_bytes and st.logical_tokens > 2 * st.physical_tokens
    # and the session goes on from there with its own API
    s.append_tokens(out[0, -1:].tolist())
    assert list(s.transcript_ids) == out[0].tolist() and s.generate(None, max_new_tokens=3).token_ids


def test_a_failing_generate_leaves_the_session_as_it_was(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.08, policy="streaming")
    s.append(TEXT)
    before = (list(s.transcript_ids), s.cache.logical_length, len(s.compactions), list(s.engine.pending))

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.shape[1] > len(before[0]) + 60:
                raise RuntimeError("boom")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([list(s.transcript_ids)])
    with pytest.raises(RuntimeError, match="boom"), generation(s) as kwargs:
        s.model.generate(
            ids,
            max_new_tokens=100,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([Boom()]),
            **kwargs,
        )
    assert (list(s.transcript_ids), s.cache.logical_length, len(s.compactions), list(s.engine.pending)) == before


def test_a_prompt_larger_than_the_budget_is_refused_with_what_to_do(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=0.08)
    ids = tokenizer(TEXT * 6, return_tensors="pt").input_ids
    with pytest.raises(Exception, match="session.append"), generation(s) as kwargs:
        s.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, **kwargs)
    assert s.cache.logical_length == 0 and not s.transcript_ids


def test_a_block_with_no_generate_leaves_the_pending_token(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    s.append(TEXT)
    before = (list(s.transcript_ids), list(s.engine.pending))
    with generation(s):
        pass
    assert (list(s.transcript_ids), list(s.engine.pending)) == before
