"""OpenAI-compatible HTTP server: one :class:`AgentSession` (its own KV budget) per conversation.

Endpoints: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. This module holds the conversations;
the HTTP layer is :mod:`agentmem.serve.http`.

Conversations. The conversation id is taken from the ``X-Conversation-Id`` header, else the body
field ``conversation_id`` (``extra_body`` in the openai client), else ``metadata["conversation_id"]``.
A request with an id reuses that conversation's session; without one, a fresh session serves the
request and is dropped. A session keeps its own history, so of the request's ``messages`` only the
new ones are read: if the messages the conversation has already read or generated are a prefix of
``messages`` (compared on role, content, tool_calls and tool_call_id), only the messages after
that prefix are read; otherwise all of ``messages`` are taken as new (a client may send just the
new turn). Requests of one conversation run one at a time; different conversations run at once on
the shared model and never see each other's memory. At most ``max_sessions`` conversations are
kept (least recently used first out).

Messages: ``system`` / ``developer`` messages are pinned (never compacted) when they take at most a
quarter of the budget; ``tool`` messages go through :func:`agentmem.tools.tool_result`, so they
are compacted right after they are read, with receipts; ``user`` / ``assistant`` messages (with
their ``tool_calls``) and the request's ``tools`` are rendered by the model's chat template. The
server does not parse tool calls out of the model's reply: replies are plain ``content``.

Extensions of the OpenAI format: body fields ``max_kv_mb`` (the conversation's KV budget, set when
it is created; default ``--max-kv-mb``), ``tool_ratio`` (compaction ratio of this request's tool
messages) and ``conversation_id``; responses (and the last stream chunk) carry a top-level
``agentmem`` object: conversation id, memory stats, the compactions run during the request and the
tool receipts. ``usage.prompt_tokens`` counts the tokens read for this request (the new messages),
not the whole history. ``temperature`` defaults to 0 (greedy) when omitted.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: malformed JSON or
invalid fields 400, unknown model 404, body over ``max_body_bytes`` 413; the server keeps serving.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..agent import AgentSession
from ..errors import AgentMemError
from ..events import CompactionEvent
from ..models import LoadedModel, load_model
from ..units import MiB
from .openai import APIError, ChatCompletionRequest, ChatMessage

log = logging.getLogger(__name__)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_kv_mb: float = Field(default=64.0, gt=0.0, description="default KV budget of a conversation (MiB)")
    max_kv_mb_limit: float = Field(default=1024.0, gt=0.0, description="largest max_kv_mb a request may ask for")
    policy: str | None = None
    max_body_bytes: int = Field(default=8 * MiB, ge=1024)
    max_sessions: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=512, ge=1, description="when the request gives no max_tokens")
    max_new_tokens_limit: int = Field(default=8192, ge=1)
    max_request_seconds: float = Field(
        default=600.0, gt=0.0, description="a reply stops (finish_reason 'length') once its request has run this long"
    )
    max_header_bytes: int = Field(default=256, ge=16, description="longest X-Conversation-Id header")


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") not in ("text", "input_text") or not isinstance(part.get("text"), str):
            kind = part.get("type")
            raise APIError(400, f"only text content parts are supported (got type {kind!r})", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _message(m: ChatMessage) -> dict:
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
    if m.name:
        d["name"] = m.name
    if m.tool_calls:
        d["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


def _key(m: dict) -> tuple:
    calls = json.dumps(m.get("tool_calls"), sort_keys=True) if m.get("tool_calls") else None
    return (m["role"], m["content"], calls, m.get("tool_call_id"))


@dataclass
class Conversation:
    session: AgentSession
    max_kv_mb: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    history: list[tuple] = field(default_factory=list)  # keys of the messages read or generated, in order


def new_messages(history: list[tuple], messages: list[dict]) -> list[dict]:
    """The messages a conversation has not read yet (see the module docstring for the rule)."""
    keys = [_key(m) for m in messages]
    if history and keys[: len(history)] == history:
        return messages[len(history) :]
    return messages


class Conversations:
    """The server's state without HTTP: one loaded model and its conversations, each a session."""

    def __init__(self, model: LoadedModel | str | None = None, config: ServerConfig | None = None, **kw):
        self.config = config or ServerConfig(**kw)
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.model_id = self.loaded.spec.name
        self.created = int(time.time())
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    # -------------------------------------------------------------- sessions
    def _new_session(self, max_kv_mb: float) -> AgentSession:
        return AgentSession(self.loaded, max_kv_mb=max_kv_mb, policy=self.config.policy)

    def conversation(self, conv_id: str | None, max_kv_mb: float | None) -> tuple[Conversation, bool]:
        """(conversation, whether it is kept after the request)."""
        if max_kv_mb is not None and max_kv_mb > self.config.max_kv_mb_limit:
            raise APIError(400, f"max_kv_mb must be <= {self.config.max_kv_mb_limit:g}", param="max_kv_mb")
        budget = max_kv_mb or self.config.max_kv_mb
        if conv_id is None:
            return Conversation(self._new_session(budget), budget), False
        with self._lock:
            conv = self._conversations.get(conv_id)
            if conv is not None:
                self._conversations.move_to_end(conv_id)
                if max_kv_mb is not None and max_kv_mb != conv.max_kv_mb:
                    raise APIError(
                        400,
                        f"conversation {conv_id!r} has max_kv_mb={conv.max_kv_mb:g}; it cannot change",
                        param="max_kv_mb",
                    )
                return conv, True
            conv = Conversation(self._new_session(budget), budget)
            self._conversations[conv_id] = conv
            while len(self._conversations) > self.config.max_sessions:
                idle = next((k for k, c in self._conversations.items() if not c.lock.locked() and k != conv_id), None)
                if idle is None:
                    break
                del self._conversations[idle]
            return conv, True

    def session(self, conv_id: str) -> AgentSession:
        """The session of a kept conversation (KeyError if there is none)."""
        with self._lock:
            return self._conversations[conv_id].session

    @property
    def conversation_ids(self) -> list[str]:
        with self._lock:
            return list(self._conversations)

    # -------------------------------------------------------------- chat
    def parse(self, body: bytes) -> ChatCompletionRequest:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(data)
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise APIError(400, f"{loc}: {err['msg']} ({exc.error_count()} error(s))", param=loc) from exc
        if req.model != self.model_id:
            message = f"model {req.model!r} does not exist; this server has {self.model_id!r}"
            raise APIError(404, message, code="model_not_found", param="model")
        return req

    def chat(self, req: ChatCompletionRequest, conv_id: str | None) -> Iterator[dict]:
        """Run one request; yields stream chunks (the last one has ``finish_reason``) as dicts.

        Everything that can fail on the request's content fails before the first chunk.
        """
        conv_id = conv_id or req.conversation_id or (req.metadata or {}).get("conversation_id")
        if conv_id is not None:
            conv_id = str(conv_id)
        conv, kept = self.conversation(conv_id, req.max_kv_mb)
        messages = [_message(m) for m in req.messages]
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_new = self.config.max_new_tokens if max_new is None else max_new
        if max_new > self.config.max_new_tokens_limit:
            raise APIError(400, f"max_tokens must be <= {self.config.max_new_tokens_limit}", param="max_tokens")
        conv.lock.acquire()
        try:
            session = conv.session
            first_event = len(session.compactions)
            t_before = len(session.transcript_ids)
            new = new_messages(conv.history, messages)
            session.tools = req.tools or None
            split = len(new) - 1 if new and new[-1]["role"] in ("user", "assistant") else len(new)
            receipts = self._feed(conv, new[:split], req)
            tail = new[split:]  # read together with the generation prompt
            events = session.chat_stream(tail, max_new, req.temperature or 0.0, req.top_p or 1.0, req.stop)
            try:  # read the prompt now: its errors are the request's, and what is recorded is what was read
                first = next(events)
            except BaseException:
                events.close()
                raise
            conv.history.extend(_key(m) for m in tail)
        except AgentMemError as exc:
            conv.lock.release()
            raise APIError(400, str(exc)) from exc
        except BaseException:
            conv.lock.release()
            raise
        run = self._run(conv, kept, conv_id, first, events, receipts, first_event, t_before)
        return Reply(run, conv.lock)

    def _feed(self, conv: Conversation, messages: list[dict], req: ChatCompletionRequest) -> list:
        """Read messages without generating: system pinned, tool outputs compacted (receipts)."""
        session = conv.session
        receipts, group = [], []
        names = {  # tool_call_id -> function name, from the request's assistant tool_calls
            c.get("id"): (c.get("function") or {}).get("name")
            for m in req.messages
            for c in m.tool_calls or []
            if isinstance(c, dict)
        }

        def flush():
            if group:
                session.read_messages(list(group))
                conv.history.extend(_key(m) for m in group)
                group.clear()

        for m in messages:
            if m["role"] == "tool":
                flush()
                name = m.get("name") or names.get(m.get("tool_call_id")) or "tool"
                receipts.append(
                    session.tool_result(name, m["content"], ratio=req.tool_ratio, tool_call_id=m.get("tool_call_id"))
                )
                conv.history.append(_key(m))
            elif m["role"] == "system":
                flush()
                n = len(session.tokenizer(m["content"], add_special_tokens=False)["input_ids"])
                session.append(m["content"], role="system", pin=n <= session.cache.max_tokens() // 4)
                conv.history.append(_key(m))
            else:
                group.append(m)
        flush()
        return receipts

    def _run(self, conv, kept, conv_id, first, events, receipts, first_event, t_before) -> Iterator[dict]:
        session = conv.session
        try:
            text, generated, finish = [], 0, "length"
            deadline = time.monotonic() + self.config.max_request_seconds
            for ev in itertools.chain([first], events):
                if ev.kind == "token":
                    generated = ev.generated_tokens
                    if ev.text:
                        text.append(ev.text)
                        yield {"delta": ev.text}
                elif ev.kind == "done":
                    generated, finish = ev.result.stats.generated_tokens, ev.result.finish_reason
                if time.monotonic() > deadline and ev.kind != "done":  # the reply so far is the reply
                    log.warning("request stopped after max_request_seconds=%s", self.config.max_request_seconds)
                    events.close()
                    break
            conv.history.append(_key({"role": "assistant", "content": "".join(text)}))
            # every token this request read: new messages, generation prompt (not the reply)
            prompt_tokens = len(session.transcript_ids) - t_before - generated
            compactions: list[CompactionEvent] = session.compactions[first_event:]
            st = session.stats
            yield {
                "finish_reason": "length" if finish == "length" else "stop",
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": generated,
                    "total_tokens": prompt_tokens + generated,
                },
                "agentmem": {
                    "conversation_id": conv_id if kept else None,
                    "max_kv_mb": conv.max_kv_mb,
                    "stats": {
                        "kv_bytes": st.kv_bytes,
                        "payload_bytes": st.payload_bytes,
                        "peak_kv_bytes": st.peak_kv_bytes,
                        "max_kv_bytes": st.max_kv_bytes,
                        "logical_tokens": st.logical_tokens,
                        "physical_tokens": st.physical_tokens,
                        "compactions_total": len(st.compactions),
                    },
                    "compactions": [e.as_dict() for e in compactions],
                    "tool_receipts": [r.as_dict(events=False) for r in receipts],
                },
            }
        finally:
            events.close()


class Reply:
    """The chunks of one reply; holds the conversation's lock until exhausted or closed."""

    def __init__(self, chunks: Iterator[dict], lock: threading.Lock):
        self._chunks, self._lock, self._held = chunks, lock, True

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._chunks
        finally:
            self.close()

    def close(self) -> None:
        if self._held:
            self._held = False
            try:
                self._chunks.close()
            finally:
                self._lock.release()
