"""Generation options (decoding.Options): what OpenAI and transformers users pass, honoured or refused."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TextStreamer, TopKLogitsWarper

from agentmem import AgentSession
from tests.helpers import TEXT


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_llama):
    _, loaded = tiny_llama
    runs = []
    for seed in (123, 123, 7):
        s = AgentSession(model=loaded, max_kv_mb=None)
        runs.append(s.generate(TEXT, max_new_tokens=24, temperature=1.0, seed=seed).token_ids)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_logit_bias_and_penalties_shape_greedy_choice(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    plain = AgentSession(model=loaded, max_kv_mb=None).generate(TEXT, max_new_tokens=12).token_ids
    forced = AgentSession(model=loaded, max_kv_mb=None).generate(TEXT, max_new_tokens=12, logit_bias={"5": 100})
    assert forced.token_ids == [5] * 12 and plain != forced.token_ids
    # two tokens lifted far above the rest: the frequency penalty makes them take turns
    both = {"5": 50, "6": 50}
    turns = AgentSession(model=loaded, max_kv_mb=None).generate(
        TEXT, max_new_tokens=12, logit_bias=both, frequency_penalty=2.0
    )
    assert set(turns.token_ids) == {5, 6} and min(turns.token_ids.count(5), turns.token_ids.count(6)) >= 3


def test_logprobs_are_the_model_distribution(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    r = s.generate(TEXT, max_new_tokens=6, logprobs=3)
    assert len(r.logprobs) == 6
    for lp, tok in zip(r.logprobs, r.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob)  # greedy: the top token
    ref = AgentSession(model=loaded, max_kv_mb=None)
    ref.append(TEXT)
    first = torch.log_softmax(ref.next_logits(), dim=-1)
    assert r.logprobs[0].logprob == pytest.approx(float(first[r.token_ids[0]]), abs=1e-4)


def test_hf_logits_processor_streamer_and_top_k(tiny_llama, tokenizer, capsys):
    _, loaded = tiny_llama
    seen = []

    def ban_first(input_ids, scores):
        seen.append(input_ids.shape[1])
        return scores

    s = AgentSession(model=loaded, max_kv_mb=None)
    n0 = len(tokenizer(TEXT)["input_ids"])
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    r = s.generate(
        TEXT,
        max_new_tokens=5,
        temperature=0.8,
        top_k=1,
        logits_processor=LogitsProcessorList([TopKLogitsWarper(3), ban_first]),
        streamer=streamer,
    )
    greedy = AgentSession(model=loaded, max_kv_mb=None).generate(TEXT, max_new_tokens=5)
    assert r.token_ids == greedy.token_ids  # top_k=1 samples the argmax
    assert seen == [n0 + i for i in range(5)]  # the processor sees the whole sequence so far
    assert capsys.readouterr().out.strip() == tokenizer.decode(r.token_ids, skip_special_tokens=True).strip()


def test_prefix_starts_the_reply(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    r = s.chat("Say something.", max_new_tokens=4, prefix="<tool_call>\n")
    assert r.text.startswith("<tool_call>\n") and s.messages[-1]["content"] == r.text
    assert s.chat_text.endswith(s.tokenizer.decode(r.token_ids, skip_special_tokens=False))
    assert "<tool_call>\n" in s.chat_text


@pytest.mark.parametrize(
    "bad",
    [
        {"top_k": -1},
        {"presence_penalty": 3},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {"0": 500}},
        {"logprobs": 50},
        {"seed": "a"},
        {"streamer": object()},
        {"nucleus": 0.5},
    ],
)
def test_bad_options_are_refused_and_change_nothing(tiny_llama, bad):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    with pytest.raises((ValueError, TypeError)) as err:
        s.generate(TEXT, max_new_tokens=3, **bad)
    assert next(iter(bad)) in str(err.value) or "logit_bias" in str(err.value)
    assert len(s.transcript_ids) == 0


@pytest.mark.filterwarnings("ignore::FutureWarning")  # past_key_values: what users of transformers pass today
def test_model_generate_with_an_agentmem_cache_says_what_to_use(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    s = AgentSession(model=loaded, max_kv_mb=None)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with pytest.raises(RuntimeError, match=r"AgentSession\(model=model.*\.generate\(prompt"):
        s.model.generate(ids, past_key_values=s.cache, max_new_tokens=3, do_sample=False)
    assert s.cache.logical_length == 0 and len(s.transcript_ids) == 0
