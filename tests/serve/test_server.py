"""The OpenAI-compatible server, driven by the real ``openai`` client on a tiny random model."""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlparse

import pytest

from agentmem import AgentSession
from agentmem.models import wrap_model
from agentmem.serve import AgentMemServer, new_messages
from tests.helpers import build_tiny

openai = pytest.importorskip("openai")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return wrap_model(build_tiny("llama", len(tokenizer)), tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def server(loaded):
    app = AgentMemServer(loaded, max_kv_mb=0.25, max_body_bytes=64 * 1024, max_new_tokens=16)
    app.start(port=0)
    yield app
    app.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def _reference(loaded, messages, max_tokens=8) -> str:
    """What a fresh session replies (greedy), with no server involved."""
    s = AgentSession(loaded, max_kv_mb=0.25)
    return s.chat(messages, max_new_tokens=max_tokens).text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    status, ctype, body = _raw(server, "GET", "/health")
    assert status == 200 and ctype == "application/json" and json.loads(body)["status"] == "ok"


def test_plain_request(client, loaded):
    messages = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _reference(loaded, messages)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    meta = r.model_extra["agentmem"]
    assert meta["conversation_id"] is None and meta["stats"]["kv_bytes"] <= meta["stats"]["max_kv_bytes"]


def test_streaming_request(client, server, loaded):
    messages = [{"role": "user", "content": "Count to three."}]
    stream = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _reference(loaded, messages)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and "agentmem" in finals[0].model_extra
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    # the raw stream is server-sent events ending with [DONE]
    body = json.dumps({"model": "tiny-llama", "messages": messages, "max_tokens": 4, "stream": True}).encode()
    status, ctype, raw = _raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    events = [e for e in raw.decode().split("\n\n") if e]
    assert status == 200 and ctype.startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_two_conversations_at_once_are_isolated(client, server, loaded):
    a = [{"role": "user", "content": "The password is swordfish. Remember it."}]
    b = [{"role": "user", "content": "Tell me about tulips in Amsterdam."}]
    replies: dict[str, str] = {}

    def run(cid, messages):
        r = client.chat.completions.create(
            model="tiny-llama", messages=messages, max_tokens=12, extra_headers={"X-Conversation-Id": cid}
        )
        replies[cid] = r.choices[0].message.content

    threads = [threading.Thread(target=run, args=("conv-a", a)), threading.Thread(target=run, args=("conv-b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # each reply is exactly what a session of its own produces: no memory shared
    assert replies["conv-a"] == _reference(loaded, a, 12) and replies["conv-b"] == _reference(loaded, b, 12)
    sessions = {cid: server.session(cid) for cid in ("conv-a", "conv-b")}
    assert "swordfish" in sessions["conv-a"].transcript() and "swordfish" not in sessions["conv-b"].transcript()
    assert "tulips" in sessions["conv-b"].transcript() and "tulips" not in sessions["conv-a"].transcript()
    # the second turn of conv-a (full history, OpenAI style) reads only the new message
    before = sessions["conv-a"].stats.logical_tokens
    follow = a + [{"role": "assistant", "content": replies["conv-a"]}, {"role": "user", "content": "What is it?"}]
    r = client.chat.completions.create(
        model="tiny-llama", messages=follow, max_tokens=4, extra_body={"conversation_id": "conv-a"}
    )
    assert r.model_extra["agentmem"]["conversation_id"] == "conv-a"
    new = r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens  # usage counts the whole prompt
    assert new < 20 and r.usage.prompt_tokens == sessions["conv-a"].stats.logical_tokens + 1 - 4
    assert sessions["conv-a"].transcript().count("swordfish") == 1
    assert sessions["conv-a"].stats.logical_tokens > before
    assert "tulips" not in sessions["conv-a"].transcript()


def test_tool_messages_are_compacted_with_receipts(client, server):
    log = "\n".join(f"step {i}: ok ({i * 37 % 101} ms)" for i in range(60))
    messages = [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "Run the build."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "build", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": log},
    ]
    tools = [{"type": "function", "function": {"name": "build", "description": "run the build", "parameters": {}}}]
    r = client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        tools=tools,
        max_tokens=4,
        extra_body={"conversation_id": "agent", "tool_ratio": 0.2},
    )
    meta = r.model_extra["agentmem"]
    (receipt,) = meta["tool_receipts"]
    assert receipt["name"] == "build" and receipt["tokens"] > 200 and receipt["ratio"] <= 0.2 + 0.01
    assert receipt["within_budget"] and receipt["openai_tokens"] > 0 and receipt["fit_output_error"] is not None
    assert meta["stats"]["peak_kv_bytes"] <= meta["stats"]["max_kv_bytes"]
    session = server.session("agent")
    assert session.pinned and session.messages[0]["role"] == "system"


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        ({"model": "tiny-llama"}, 400, None),
        ({"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"model": "tiny-llama", "messages": USER, "n": 2}, 400, None),
        ({"model": "tiny-llama", "messages": USER, "max_tokens": "lots"}, 400, None),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, None),
        ({"model": "gpt-9", "messages": USER}, 404, "model_not_found"),
    ],
)
def test_malformed_requests_get_json_errors(server, client, body, status, code):
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, ctype, raw = _raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    err = json.loads(raw)["error"]
    assert got == status and ctype == "application/json"
    assert err["message"] and err["type"] == "invalid_request_error" and err["code"] == code
    # the server keeps serving
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content is not None


def test_errors_through_the_client_and_unknown_routes(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[])
    with pytest.raises(openai.BadRequestError):  # a conversation's budget is fixed when it starts
        for mb in (0.25, 0.5):
            client.chat.completions.create(
                model="tiny-llama",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=1,
                extra_body={"conversation_id": "fixed", "max_kv_mb": mb},
            )
    assert _raw(server, "GET", "/v1/nothing")[0] == 404
    assert _raw(server, "GET", "/v1/chat/completions")[0] == 405


def test_oversize_body_gets_413_and_the_server_keeps_serving(server, client):
    big = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    status, ctype, raw = _raw(server, "POST", "/v1/chat/completions", big, {"Content-Type": "application/json"})
    assert status == 413 and ctype == "application/json"
    assert json.loads(raw)["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "y" * 100_000}])
    assert info.value.status_code == 413
    r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_new_messages_rule():
    def k(role, content):
        return (role, content, None, None)

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert new_messages([], msgs) == msgs
    assert new_messages([k("user", "a"), k("assistant", "b")], msgs) == msgs[2:]  # full history sent
    assert new_messages([k("user", "a"), k("assistant", "b")], msgs[2:]) == msgs[2:]  # only the new turn sent
    assert new_messages([k("user", "z")], msgs) == msgs  # not a prefix: all taken as new


# ---------------------------------------------------------------- limits (reliability)
def _post(server, body: dict | bytes, headers: dict | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _raw(server, "POST", "/v1/chat/completions", raw, {"Content-Type": "application/json", **(headers or {})})


def test_fifty_clients_at_once_are_all_answered(server):
    """A burst of 50 connections (the stdlib's listen backlog of 5 reset most of them)."""
    barrier, statuses = threading.Barrier(50), []

    def one(i: int) -> None:
        barrier.wait()
        try:
            status, _, _ = _post(server, {"model": "tiny-llama", "messages": [{"role": "user", "content": f"hi {i}"}]})
        except OSError as exc:
            status = repr(exc)
        statuses.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert statuses == [200] * 50


def test_nested_json_and_long_headers_are_400(server, client):
    deep = b'{"model": "tiny-llama", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    status, _, raw = _post(server, deep)
    assert status == 400 and "nested too deeply" in json.loads(raw)["error"]["message"]
    ok = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, _, raw = _post(server, ok, {"X-Conversation-Id": "x" * 8000})
    assert status == 400 and json.loads(raw)["error"]["param"] == "X-Conversation-Id"
    status, _, _ = _post(server, ok, {"X-Conversation-Id": "x" * 200})
    assert status == 200


def test_requests_stop_at_the_time_limit(loaded):
    app = AgentMemServer(loaded, max_kv_mb=0.25, max_new_tokens=400, max_request_seconds=0.05)
    app.start(port=0)
    try:
        req = {"model": "tiny-llama", "messages": [{"role": "user", "content": "count"}], "stream": False}
        req["max_tokens"] = 400
        status, _, raw = _post(app, req)
        body = json.loads(raw)
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] < 400
    finally:
        app.shutdown()


def test_history_keys_ignore_what_clients_change_when_they_echo_a_reply():
    from agentmem.serve import message_key

    sent = {
        "role": "assistant",
        "content": "Let me check.\n",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1, "b": 2}'}}
        ],
    }
    echoed = {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"b":2,"a":1}'}}],
    }
    assert message_key(sent) == message_key(echoed)
    assert message_key({"role": "assistant", "content": None}) == message_key({"role": "assistant", "content": ""})
    msgs = [{"role": "user", "content": "a"}, echoed, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    assert new_messages([message_key(msgs[0]), message_key(sent)], msgs) == msgs[2:]


def test_a_reply_stopped_before_its_first_token_is_not_in_the_history(loaded):
    from agentmem.serve import message_key

    app = AgentMemServer(loaded, max_kv_mb=0.06, policy="streaming", max_request_seconds=1e-9)
    app.start(port=0)
    try:
        long_turn = [{"role": "user", "content": "word " * 400}]  # compacted while it is read
        status, _, raw = _post(
            app, {"model": "tiny-llama", "messages": long_turn, "max_tokens": 8}, {"X-Conversation-Id": "c"}
        )
        body = json.loads(raw)
        session = app.session("c")
        assert status == 200 and body["usage"]["completion_tokens"] == 0 and session.compactions
        assert session.messages[-1]["role"] == "user"  # no reply was generated, and none is recorded
        keys = app._conversations["c"].history
        assert keys == [message_key(long_turn[0])]
    finally:
        app.shutdown()
