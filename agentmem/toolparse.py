"""Tool calls in a model's reply: the Hermes / Qwen 2.5 format.

Qwen 2.5's chat template asks the model to answer a tool request with
``<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>``
(the Hermes convention; vLLM's ``hermes`` parser reads the same). :func:`parse_tool_calls` splits
a reply into its plain text and the calls; a block whose JSON does not parse, or has no name,
stays in the text (the caller sees what the model wrote, nothing is dropped silently).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict

    def as_openai(self, call_id: str) -> dict:
        """The OpenAI ``tool_calls`` item (arguments as a JSON string)."""
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class ParsedReply:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def parse_tool_calls(text: str, tools: Sequence[str] | None = None) -> ParsedReply:
    """The reply's text without its well-formed ``<tool_call>`` blocks, and those calls in order.

    An unterminated last block (generation stopped before ``</tool_call>``) counts if its JSON is
    complete. ``arguments`` given as a JSON string are decoded. ``tools``: the names of the tools
    offered; then a reply with no ``<tool_call>`` block that is nothing but a call to one of them
    as JSON (``{"name", "arguments"}``, or a list of such, optionally in a code fence -- what small
    models often write instead of the tags) is read as those calls.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _BLOCK.finditer(text):
        call = _call(m.group(1))
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    if not calls and tools:
        bare = _bare_calls(text, tools)
        if bare:
            return ParsedReply("", bare)
    return ParsedReply("".join(kept).strip() if calls else text, calls)


_FENCE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)


def _bare_calls(text: str, tools: Sequence[str]) -> list[ToolCall]:
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    if not body.startswith(("{", "[")):
        return []
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call(json.dumps(item)) if isinstance(item, dict) else None for item in items]
    if not calls or any(c is None or c.name not in tools for c in calls):
        return []
    return calls


def _call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args)


OPEN = "<tool_call>"


def forced_prefix(name: str | None = None) -> str:
    """The opening of a Hermes tool call that a reply is made to start with (``tool_choice``):
    any function (``"required"``), or the function ``name`` (a named choice; its arguments follow)."""
    if name is None:
        return OPEN + '\n{"name": "'
    return OPEN + '\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


class ContentStream:
    """A reply's text streamed as content while tool calls are held back: from the first
    ``<tool_call>`` on (and a trailing ``<tool_c...`` that may become one) nothing is sent until
    the reply ends; :meth:`finish` then parses the whole reply."""

    def __init__(self, tools: Sequence[str] | None = None) -> None:
        self.tools = tools
        self.text = ""
        self.sent = 0  # characters of ``text`` sent as content
        self.blocked = False

    def push(self, delta: str) -> str:
        """Add generated text; returns the content that can be sent now."""
        self.text += delta
        if self.blocked:
            return ""
        head = self.text.lstrip()
        if self.tools and self.sent == 0 and (not head or head[0] in "{[`"):  # may be a bare JSON call
            if head:
                self.blocked = True
            return ""
        at = self.text.find(OPEN, max(0, self.sent - len(OPEN)))
        if at >= 0:
            self.blocked = True
            end = at
        else:
            hold = next(
                (k for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1) if OPEN.startswith(self.text[-k:])), 0
            )
            end = len(self.text) - hold
        out, self.sent = self.text[self.sent : max(self.sent, end)], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not sent yet, and the reply's tool calls (none: everything held back is content)."""
        parsed = parse_tool_calls(self.text, self.tools)
        if not parsed.calls:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return rest, []
        sent = self.text[: self.sent].strip()
        rest = parsed.content[len(sent) :] if parsed.content.startswith(sent) else ""
        self.sent = len(self.text)
        return rest, parsed.calls
