"""The server's conversations: one :class:`AgentSession` (its own KV budget) per conversation.

Endpoints served (:mod:`agentmem.serve.http`): ``POST /v1/chat/completions`` and
``POST /v1/completions`` (JSON, or server-sent events with ``"stream": true``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``. This module holds what a request does.

Conversations. The conversation id is taken from the ``X-Conversation-Id`` header, else the body
field ``conversation_id`` (``extra_body`` in the openai client), else ``metadata["conversation_id"]``.
A request with an id reuses that conversation's session; without one, a fresh session serves the
request and is dropped. A session keeps its own history, so of the request's ``messages`` only the
new ones are read: if the messages the conversation has already read or generated are a prefix of
``messages`` (compared on role, content, tool calls (name and parsed arguments) and tool_call_id),
only the messages after that prefix are read; otherwise all of ``messages`` are taken as new (a
client may send just the new turn). Requests of one conversation run one at a time; different
conversations run at once on the shared model and never see each other's memory. At most
``max_sessions`` conversations are kept (least recently used first out).

A request is all or nothing: it runs in one session transaction. If the client goes away before
the reply is complete (or the request fails), the conversation is put back exactly as it was
before the request -- its memory, history and sampler -- so the client's next turn is read as if
the cancelled one never happened. A reply stopped by ``max_request_seconds`` is kept (finish
reason ``length``).

Messages: ``system`` / ``developer`` messages are pinned (never compacted) when they take at most a
quarter of the budget; ``tool`` messages go through :func:`agentmem.tools.tool_result`, so they
are compacted right after they are read, with receipts; ``user`` / ``assistant`` messages (with
their ``tool_calls``) and the request's ``tools`` are rendered by the model's chat template.

Tool calls in the reply are parsed in the Hermes / Qwen 2.5 format (:mod:`agentmem.toolparse`)
into OpenAI ``tool_calls`` (``finish_reason`` ``tool_calls``); ``tool_choice``: ``auto`` (the
default with tools), ``none`` (tools are not shown to the model and nothing is parsed),
``required`` and a named function (the reply is made to start with a tool call, of that function);
``parallel_tool_calls=false`` keeps the first call.

Extensions of the OpenAI format: body fields ``max_kv_mb`` (the conversation's KV budget, set when
it is created; default ``--max-kv-mb``), ``tool_ratio`` (compaction ratio of this request's tool
messages), ``top_k`` and ``conversation_id``; responses (and the last stream chunk) carry a
top-level ``agentmem`` object: conversation id, memory stats, the compactions run during the
request and the tool receipts. ``usage.prompt_tokens`` counts every token of the prompt (the
conversation so far and the new messages); ``usage.prompt_tokens_details.cached_tokens`` those
that were already in memory before the request. ``temperature`` defaults to 0 (greedy).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..agent import AgentSession
from ..errors import AgentMemError, PinRefused
from ..models import LoadedModel, load_model
from ..toolparse import ContentStream, forced_prefix
from ..units import MiB
from .openai import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest

log = logging.getLogger(__name__)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_kv_mb: float = Field(default=64.0, gt=0.0, description="default KV budget of a conversation (MiB)")
    max_kv_mb_limit: float = Field(default=1024.0, gt=0.0, description="largest max_kv_mb a request may ask for")
    policy: str | None = None
    budget_covers: Literal["kv", "all"] = Field(
        default="kv", description="kv: max_kv_mb bounds a conversation's cache; all: its cache, query buffer and work"
    )
    max_work_mb: float | None = Field(default=None, gt=0.0, description="bound on one compaction's working memory")
    max_body_bytes: int = Field(default=8 * MiB, ge=1024)
    max_sessions: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=512, ge=1, description="when the request gives no max_tokens")
    max_new_tokens_limit: int = Field(default=8192, ge=1)
    max_request_seconds: float = Field(
        default=600.0, gt=0.0, description="a reply stops (finish_reason 'length') once its request has run this long"
    )
    max_header_bytes: int = Field(default=256, ge=16, description="longest X-Conversation-Id header")
    api_key: str | None = Field(default=None, description="clients must send 'Authorization: Bearer <api_key>'")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS ('*': any)")
    seed: int = Field(default=0, description="seed of each new conversation's sampler (a request's seed overrides)")
    auto_recall: bool = Field(
        default=False, description="before a user turn, read back the compacted tool-output lines that match it"
    )


class Cancelled(Exception):
    """The client went away: the request's transaction is rolled back."""


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


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def message_key(m: dict) -> tuple:
    """What identifies a message when a client sends the history back: role, content (None and ""
    alike), tool calls by name and parsed arguments (ids and JSON spacing may differ), tool_call_id."""
    calls = None
    if m.get("tool_calls"):
        fns = [(c.get("function") or {}) for c in m["tool_calls"] if isinstance(c, dict)]
        calls = json.dumps([[f.get("name"), _arguments(f.get("arguments"))] for f in fns], sort_keys=True)
    return (m["role"], (m.get("content") or "").strip(), calls, m.get("tool_call_id"))


@dataclass
class Conversation:
    session: AgentSession
    max_kv_mb: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    history: list[tuple] = field(default_factory=list)  # keys of the messages read or generated, in order
    active: int = 0  # requests holding it (looked up, not yet done): never evicted meanwhile


def new_messages(history: list[tuple], messages: list[dict]) -> list[dict]:
    """The messages a conversation has not read yet (see the module docstring for the rule)."""
    keys = [message_key(m) for m in messages]
    if history and keys[: len(history)] == history:
        return messages[len(history) :]
    return messages


class Conversations:
    """The server's state without HTTP: one loaded model and its conversations, each a session.

    :meth:`chat` and :meth:`complete` are generators of reply chunks (dicts) meant to run start to
    finish in one thread (a session's lock belongs to the thread that takes it); a request-level
    error is raised as :class:`APIError` before the first chunk.
    """

    def __init__(self, model: LoadedModel | str | None = None, config: ServerConfig | None = None, **kw):
        self.config = config or ServerConfig(**kw)
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.model_id = self.loaded.spec.name
        self.created = int(time.time())
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._lock = threading.Lock()

    # -------------------------------------------------------------- sessions
    def _new_session(self, max_kv_mb: float) -> AgentSession:
        cfg = self.config
        return AgentSession(
            self.loaded,
            max_kv_mb=max_kv_mb,
            policy=cfg.policy,
            seed=cfg.seed,
            auto_recall=cfg.auto_recall,
            max_work_mb=cfg.max_work_mb,
            budget_covers=cfg.budget_covers,
        )

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
                conv.active += 1
                return conv, True
            conv = Conversation(self._new_session(budget), budget, active=1)
            self._conversations[conv_id] = conv
            while len(self._conversations) > self.config.max_sessions:
                idle = next((k for k, c in self._conversations.items() if not c.active and not c.lock.locked()), None)
                if idle is None:
                    break
                del self._conversations[idle]
            return conv, True

    @contextmanager
    def _use(self, conv: Conversation) -> Iterator[None]:
        """Hold a conversation for one request (one at a time); it is released, and may be evicted
        again, when the request is done."""
        try:
            with conv.lock:
                yield
        finally:
            with self._lock:
                conv.active = max(0, conv.active - 1)

    def session(self, conv_id: str) -> AgentSession:
        """The session of a kept conversation (KeyError if there is none)."""
        with self._lock:
            return self._conversations[conv_id].session

    @property
    def conversation_ids(self) -> list[str]:
        with self._lock:
            return list(self._conversations)

    # -------------------------------------------------------------- requests
    def parse(self, body: bytes, kind: type[BaseModel] = ChatCompletionRequest):
        """A request body, validated; APIError (400 naming the field, or 404 for another model)."""
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = kind.model_validate(data)
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"{loc} is not a field agentmem accepts (refused rather than ignored)"
            raise APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None) from exc
        if req.model != self.model_id:
            message = f"model {req.model!r} does not exist; this server has {self.model_id!r}"
            raise APIError(404, message, code="model_not_found", param="model")
        return req

    def _max_new(self, *values: int | None) -> int:
        given = next((v for v in values if v is not None), None)
        max_new = self.config.max_new_tokens if given is None else given
        if max_new > self.config.max_new_tokens_limit:
            raise APIError(400, f"max_tokens must be <= {self.config.max_new_tokens_limit}", param="max_tokens")
        return max_new

    def _options(self, req, logprobs: int | None) -> dict:
        """The session's generation options for a request (unset fields are left out)."""
        names = ("top_k", "presence_penalty", "frequency_penalty", "logit_bias")
        opts: dict[str, Any] = {name: getattr(req, name) for name in names if getattr(req, name)}
        if req.seed is not None:
            opts["seed"] = req.seed
        if logprobs is not None:
            opts["logprobs"] = logprobs
        return opts

    def _conv_id(self, header: str | None, req) -> str | None:
        conv_id = header or req.conversation_id or (getattr(req, "metadata", None) or {}).get("conversation_id")
        return None if conv_id is None else str(conv_id)

    def chat(self, req: ChatCompletionRequest, conv_header: str | None, cancelled: threading.Event | None = None):
        """One chat completion: chunks ``{"delta"}``, ``{"logprobs"}``, ``{"tool_calls"}``, then the
        final ``{"finish_reason", "usage", "agentmem"}``."""
        conv_id = self._conv_id(conv_header, req)
        messages = [_message(m) for m in req.messages]
        max_new = self._max_new(req.max_completion_tokens, req.max_tokens)
        opts = self._options(req, (req.top_logprobs or 0) if req.logprobs else None)
        tools = req.tools if req.tools and req.tool_choice != "none" else None
        if tools and (req.tool_choice == "required" or req.forced_tool):
            opts["prefix"] = forced_prefix(req.forced_tool)
        conv, kept = self.conversation(conv_id, req.max_kv_mb)
        with self._use(conv), ExitStack() as stack:  # one request of a conversation at a time
            session = conv.session
            n_history, first_event, t_before = len(conv.history), len(session.compactions), len(session.transcript_ids)
            stack.enter_context(session.transaction())
            try:
                new = new_messages(conv.history, messages)
                if new is messages:  # not a continuation of what the conversation holds: keys start again
                    del conv.history[:]
                session.tools = tools
                split = len(new) - 1 if new and new[-1]["role"] in ("user", "assistant") else len(new)
                receipts = self._feed(conv, new[:split], req)
                tail = new[split:]  # read together with the generation prompt
                events = session.chat_stream(tail, max_new, req.temperature or 0.0, req.top_p or 1.0, req.stop, **opts)
                conv.history.extend(message_key(m) for m in tail)
                names = [(x.get("function") or {}).get("name") for x in tools or []]
                content = ContentStream(names) if tools else None
                if content is not None:
                    content.push(opts.get("prefix", ""))
                result = yield from self._reply(events, cancelled, content)
                finish = "length" if result["finish"] == "length" else "stop"
                message = {"role": "assistant", "content": result["text"]}  # the history holds what was sent
                if content is not None:
                    shown = content.text[: content.sent]
                    rest, calls = content.finish()
                    if rest:
                        yield {"delta": rest}
                    message["content"] = shown + rest
                    if calls:
                        calls = calls[:1] if req.parallel_tool_calls is False else calls
                        message["tool_calls"] = [c.as_openai(f"call_{uuid.uuid4().hex[:24]}") for c in calls]
                        yield {"tool_calls": message["tool_calls"]}
                        finish = "tool_calls"
                if result["replied"]:  # the session recorded a reply (not when stopped before its first token)
                    conv.history.append(message_key(message))
                yield self._final(conv, kept, conv_id, result, finish, receipts, first_event, t_before)
            except AgentMemError as exc:
                del conv.history[n_history:]
                raise APIError(400, str(exc)) from exc
            except BaseException:
                del conv.history[n_history:]  # the transaction puts the session back; the history goes with it
                raise

    def complete(self, req: CompletionRequest, conv_header: str | None, cancelled: threading.Event | None = None):
        """One text completion (no chat template): chunks as :meth:`chat`'s, and ``{"echo"}`` first."""
        conv_id = self._conv_id(conv_header, req)
        max_new = self._max_new(req.max_tokens)
        opts = self._options(req, req.logprobs)
        conv, kept = self.conversation(conv_id, req.max_kv_mb)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
        with self._use(conv), ExitStack() as stack:
            session = conv.session
            first_event, t_before = len(session.compactions), len(session.transcript_ids)
            stack.enter_context(session.transaction())
            try:
                args = (max_new, req.temperature or 0.0, req.top_p or 1.0, req.stop)
                if isinstance(prompt, str):
                    events = session.stream(prompt, *args, **opts)
                else:
                    events = session.stream_tokens(prompt, *args, **opts)
                echo = None
                if req.echo:
                    echo = prompt if isinstance(prompt, str) else session.tokenizer.decode(prompt)
                result = yield from self._reply(events, cancelled, None, echo)
                finish = "length" if result["finish"] == "length" else "stop"
                yield self._final(conv, kept, conv_id, result, finish, [], first_event, t_before)
            except AgentMemError as exc:
                raise APIError(400, str(exc)) from exc

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
                conv.history.extend(message_key(m) for m in group)
                group.clear()

        for m in messages:
            if m["role"] == "tool":
                flush()
                name = m.get("name") or names.get(m.get("tool_call_id")) or "tool"
                receipts.append(
                    session.tool_result(name, m["content"], ratio=req.tool_ratio, tool_call_id=m.get("tool_call_id"))
                )
                conv.history.append(message_key(m))
            elif m["role"] == "system":
                flush()
                n = len(session.tokenizer(m["content"], add_special_tokens=False)["input_ids"])
                try:  # pinned if it is short and the policy keeps room to work beside it (tools render into it)
                    session.append(m["content"], role="system", pin=n <= session.cache.max_tokens() // 4)
                except PinRefused:
                    session.append(m["content"], role="system")
                conv.history.append(message_key(m))
            else:
                group.append(m)
        flush()
        return receipts

    def _reply(self, events: Iterator, cancelled: threading.Event | None, content: ContentStream | None, echo=None):
        """Run the generation: the prompt is read before the first chunk (its errors are the
        request's); yields text and logprob chunks; returns what the final chunk needs."""
        deadline = time.monotonic() + self.config.max_request_seconds
        text, generated, finish, result = [], 0, "length", None
        try:
            first = next(events)
            yield {"started": True}
            if echo is not None:
                yield {"delta": echo, "echo": True}
            for ev in _chain(first, events):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled()
                if ev.kind == "token":
                    generated = ev.generated_tokens
                    if ev.logprobs:
                        yield {"logprobs": ev.logprobs}
                    if ev.text:
                        text.append(ev.text)
                        out = content.push(ev.text) if content is not None else ev.text
                        if out:
                            yield {"delta": out}
                elif ev.kind == "done":
                    result = ev.result
                    generated, finish = result.stats.generated_tokens, result.finish_reason
                if time.monotonic() > deadline and ev.kind != "done":  # the reply so far is the reply
                    log.warning("request stopped after max_request_seconds=%s", self.config.max_request_seconds)
                    break
        finally:
            events.close()
        replied = result is not None or generated > 0
        return {"text": "".join(text), "generated": generated, "finish": finish, "replied": replied}

    def _final(self, conv, kept, conv_id, result, finish, receipts, first_event, t_before) -> dict:
        session = conv.session
        prompt_tokens = len(session.transcript_ids) - result["generated"]
        st = session.stats
        return {
            "finish_reason": finish,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": result["generated"],
                "total_tokens": prompt_tokens + result["generated"],
                "prompt_tokens_details": {"cached_tokens": t_before},
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
                "compactions": [e.as_dict() for e in session.compactions[first_event:]],
                "tool_receipts": [r.as_dict(events=False) for r in receipts],
            },
        }


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest
