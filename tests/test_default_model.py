"""The real embedded default model (SmolLM2-135M-Instruct) under a budget. Marked slow."""

from __future__ import annotations

import pytest

from agentmem import AgentSession

pytestmark = pytest.mark.slow


def test_1200_tokens_under_8_mib(default_model):
    s = AgentSession(model=default_model, max_kv_mb=8)
    worst = 0
    pieces = []
    for ev in s.stream(
        "Chapter 1\n\nThe old lighthouse keeper had lived alone on the island for thirty years.",
        max_new_tokens=1200,
        temperature=0.8,
        top_p=0.95,
        ignore_eos=True,
    ):
        worst = max(worst, s.cache.kv_bytes)
        pieces.append(ev.text)
    st = s.stats
    assert worst <= 8 * 2**20 and st.peak_kv_bytes <= 8 * 2**20
    assert len(st.compactions) >= 5
    assert st.logical_tokens >= 1200 > 5 * st.physical_tokens
    text = "".join(pieces)
    assert len(text) > 2500 and len(set(text.split())) > 50  # text keeps coming


def test_10000_token_input_under_16_mib(default_model):
    """Past the model's 8,192 trained positions: positions stay in range."""
    from agentmem.bench.positions import long_text

    ids, _ = long_text(10000, default_model.tokenizer)
    s = AgentSession(model=default_model, max_kv_mb=16)
    s.append(default_model.tokenizer.decode(ids))
    st = s.stats
    assert st.peak_kv_bytes <= 16 * 2**20
    assert st.logical_tokens > 9500 and st.physical_tokens < 400
    assert s.cache.next_position <= default_model.spec.max_position_embeddings
    r = s.generate("\n\ndef", max_new_tokens=20)
    assert r.stats.generated_tokens > 0


def test_bad_budget_names_the_fix(default_model):
    from agentmem import BudgetError

    with pytest.raises(BudgetError, match=r"use max_kv_mb >= \d+\.\d\d"):
        AgentSession(model=default_model, max_kv_mb=0.2)


def test_non_uniform_compaction_of_4096_tokens_frees_memory(default_model):
    """Global (per-context) head budgets at ratio 0.1: heads end uneven, and the bytes held follow them."""
    from agentmem.bench.positions import long_text

    ids, _ = long_text(4096, default_model.tokenizer)
    s = AgentSession(model=default_model, max_kv_mb=None, policy={"name": "am-halve", "head_budgets": "global"})
    s.append_tokens(ids[:4096])
    s.compact(0.1)
    lengths = [n for layer in s.cache.layers for n in layer.lengths]
    assert max(lengths) > 2 * min(lengths)  # really non-uniform
    assert abs(sum(lengths) / len(lengths) - 0.1 * 4096) < 2  # same total as uniform
    st = s.stats
    assert st.kv_bytes <= 1.10 * st.payload_bytes
    assert s.generate(" The", max_new_tokens=5).stats.generated_tokens == 5
