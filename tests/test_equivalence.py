"""With a budget that is never reached, agentmem reproduces transformers token for token."""

from __future__ import annotations

import pytest
import torch

from agentmem import AgentSession
from tests.helpers import TEXT


def hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_greedy_matches_hf_generate(tiny, tokenizer):
    ref, loaded = tiny
    prompt = TEXT * 2  # longer than the tiny Gemma's 16-token sliding window
    expected = hf_greedy(ref, tokenizer, prompt, 40)
    session = AgentSession(model=loaded, max_kv_mb=None)
    result = session.generate(prompt, max_new_tokens=40)
    assert result.token_ids == expected
    assert session.compactions == []


def test_chunked_prefill_matches_full_forward(tiny, tokenizer):
    """Reading in chunks of 7 tokens gives the same next-token logits as one forward."""
    ref, loaded = tiny
    ids = tokenizer(TEXT * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref(ids).logits[0, -1]
    session = AgentSession(model=loaded, max_kv_mb=None, chunk_tokens=7)
    session.append_tokens(ids[0].tolist())
    got = session.next_logits()
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_position_continues_from_logical_length(tiny_llama, tokenizer):
    _, loaded = tiny_llama
    session = AgentSession(model=loaded, max_kv_mb=None)
    session.append(TEXT)
    n = len(tokenizer(TEXT)["input_ids"])
    assert session.stats.logical_tokens == n - 1  # the last token read is pending
    assert session.stats.pending_tokens == 1
    session.generate(None, max_new_tokens=5)
    assert session.cache.next_position == session.stats.logical_tokens == n + 4


@pytest.mark.slow
def test_default_model_greedy_matches_hf(default_model):
    from transformers import AutoModelForCausalLM

    tok = default_model.tokenizer
    ref = AutoModelForCausalLM.from_pretrained(
        _converted(default_model), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    expected = hf_greedy(ref, tok, prompt, 48)
    session = AgentSession(model=default_model, max_kv_mb=64)
    assert session.generate(prompt, max_new_tokens=48).token_ids == expected


def _converted(loaded):
    from agentmem.models import _converted_dir

    return _converted_dir(loaded.path)
