"""Tool calls in the Hermes / Qwen 2.5 format."""

from __future__ import annotations

from agentmem.toolparse import ToolCall, parse_tool_calls


def test_calls_are_split_from_the_text():
    text = 'Let me look.\n<tool_call>\n{"name": "recall", "arguments": {"query": "ROLLBACK_ID"}}\n</tool_call>'
    r = parse_tool_calls(text)
    assert r.content == "Let me look." and r.calls == [ToolCall("recall", {"query": "ROLLBACK_ID"})]
    two = parse_tool_calls(
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name": "b"}</tool_call>'
    )
    assert two.calls == [ToolCall("a", {"x": 1}), ToolCall("b", {})] and two.content == ""
    assert two.calls[0].as_openai("call_0")["function"] == {"name": "a", "arguments": '{"x": 1}'}


def test_unterminated_and_malformed_blocks():
    assert parse_tool_calls('<tool_call>\n{"name": "run", "arguments": {}}').calls == [ToolCall("run", {})]
    bad = "<tool_call>{not json}</tool_call> and text"
    assert parse_tool_calls(bad).calls == [] and parse_tool_calls(bad).content == bad
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>').calls == []  # no name
    assert parse_tool_calls("plain answer 42").content == "plain answer 42"
