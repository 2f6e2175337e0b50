"""Every request field is honoured or refused: the server's OpenAI surface on a tiny random model
(auth, CORS, OPTIONS/HEAD, seeds, logprobs, penalties, /v1/completions, cancellation)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlparse

import pytest

from agentmem import AgentSession
from agentmem.models import wrap_model
from agentmem.serve import AgentMemServer
from tests.helpers import build_tiny

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = "tiny-llama"
USER = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return wrap_model(build_tiny("llama", len(tokenizer)), tokenizer, name=MODEL)


@pytest.fixture(scope="module")
def server(loaded):
    app = AgentMemServer(
        loaded, max_kv_mb=0.25, max_new_tokens=16, api_key="sk-test", cors_origins=["https://app.example"]
    )
    app.start(port=0)
    yield app
    app.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


def _raw(server, method, path, body=None, headers=None):
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


AUTH = {"Authorization": "Bearer sk-test"}


def test_api_key_options_head_and_cors(server, client):
    assert _raw(server, "GET", "/v1/models")[0] == 401
    status, headers, body = _raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert _raw(server, "GET", "/health")[0] == 200  # open to load balancers
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert _raw(server, "HEAD", "/v1/models", headers=AUTH)[0] == 200
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    status, headers, _ = _raw(server, "OPTIONS", "/v1/chat/completions", headers=pre)
    assert status == 200 and headers.get("access-control-allow-origin") == "https://app.example"
    status, headers, _ = _raw(server, "GET", "/v1/models", headers={**AUTH, "Origin": "https://app.example"})
    assert headers.get("access-control-allow-origin") == "https://app.example"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 3}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logit_bias": {"999999999": 5}}, "logit_bias"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
    ],
)
def test_refused_fields_get_a_400_naming_them(server, extra, param):
    status, _, body = _raw(server, "POST", "/v1/chat/completions", {"model": MODEL, "messages": USER, **extra}, AUTH)
    err = json.loads(body)["error"]
    assert status == 400 and param in err["message"], err


def test_seeded_sampling_is_reproducible(client):
    def run(seed):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=16, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    a, b, c = run(123), run(123), run(7)
    assert a == b and a != c


def test_logprobs_penalties_and_logit_bias(client, loaded):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)  # greedy takes the top token
    forced = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, logit_bias={"5": 100})
    assert forced.choices[0].message.content == loaded.tokenizer.decode([5] * 5)
    turns = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=8, logit_bias={"5": 50, "6": 50}, frequency_penalty=2.0
    )
    text = turns.choices[0].message.content
    assert loaded.tokenizer.decode([5]) in text and loaded.tokenizer.decode([6]) in text


def test_text_completions(client, loaded):
    prompt = "The lighthouse keeper"
    ref = AgentSession(loaded, max_kv_mb=0.25).generate(prompt, max_new_tokens=8)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, echo=True, logprobs=1)
    assert echo.choices[0].text == prompt + ref.text and len(echo.choices[0].logprobs.tokens) >= 1
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, stream=True)
        if c.choices
    )
    assert streamed == ref.text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=prompt, suffix="end")


def test_a_cancelled_stream_leaves_the_conversation_as_before(server, client, loaded):
    conv = {"X-Conversation-Id": "cancel-me"}
    first = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, extra_headers=conv)
    history = USER + [{"role": "assistant", "content": first.choices[0].message.content}]
    session = server.session("cancel-me")
    before = (session.stats.logical_tokens, len(session.messages))
    follow = history + [{"role": "user", "content": "And then?"}]
    # open a long streamed reply, read a little of it, and hang up
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    body = json.dumps({"model": MODEL, "messages": follow, "max_tokens": 400, "stream": True}).encode()
    fields = {"Host": "x", "Content-Type": "application/json", "Authorization": "Bearer sk-test"}
    fields.update({"X-Conversation-Id": "cancel-me", "Content-Length": str(len(body))})
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    sock.sendall(head.encode() + body)
    got = b""
    while b"data:" not in got:
        got += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 60
    while (session.stats.logical_tokens, len(session.messages)) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (session.stats.logical_tokens, len(session.messages)) == before
    # the next turn is read as if the cancelled one never happened
    r = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=6, extra_headers=conv)
    ref = AgentSession(loaded, max_kv_mb=0.25)
    ref.chat(USER, max_new_tokens=6)
    assert r.choices[0].message.content == ref.chat([{"role": "user", "content": "And then?"}], max_new_tokens=6).text


def test_auto_recall_reads_back_what_a_user_turn_asks_about(loaded):
    app = AgentMemServer(loaded, max_kv_mb=0.25, max_new_tokens=4, auto_recall=True)
    app.start(port=0)
    try:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0, timeout=60)
        log = "\n".join(f"step {i}: ok ({i * 37 % 101} ms)" for i in range(60)) + "\nROLLBACK_ID=RB-58213\n"
        call = {"id": "c1", "type": "function", "function": {"name": "deploy", "arguments": "{}"}}
        messages = [
            {"role": "user", "content": "Deploy."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": log},
        ]
        conv = {"X-Conversation-Id": "recall"}
        first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_headers=conv)
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "What is the ROLLBACK_ID?"},
        ]
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_headers=conv)
        session = app.session("recall")
        recalled = [m for m in session.messages if m["role"] == "tool" and "RB-58213" in m["content"]]
        assert len(recalled) == 2 and session.messages[-3]["role"] == "tool"  # the output, then the recall
        assert session.stats.peak_kv_bytes <= session.stats.max_kv_bytes
    finally:
        app.shutdown()


def test_a_client_that_hangs_up_on_a_whole_reply_cancels_it(server, client):
    conv = {"X-Conversation-Id": "hang-up"}
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, extra_headers=conv)
    session = server.session("hang-up")
    before = (session.stats.logical_tokens, len(session.messages))
    url = urlparse(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    follow = USER + [{"role": "user", "content": "Go on, at length."}]
    body = json.dumps({"model": MODEL, "messages": follow, "max_tokens": 4000}).encode()
    fields = {"Host": "x", "Content-Type": "application/json", "Authorization": "Bearer sk-test"}
    fields.update({"X-Conversation-Id": "hang-up", "Content-Length": str(len(body))})
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    sock.sendall(head.encode() + body)
    deadline = time.monotonic() + 30
    while session.stats.logical_tokens == before[0] and time.monotonic() < deadline:  # generation under way
        time.sleep(0.01)
    sock.close()
    deadline = time.monotonic() + 60
    while (session.stats.logical_tokens, len(session.messages)) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (session.stats.logical_tokens, len(session.messages)) == before


def test_the_server_gives_conversations_the_memory_settings_it_was_started_with(loaded):
    from agentmem.cli import build_parser

    args = build_parser().parse_args(["serve", "--budget-covers", "all", "--max-work-mb", "0.05"])
    assert (args.budget_covers, args.max_work_mb) == ("all", 0.05)
    app = AgentMemServer(loaded, max_kv_mb=0.5, max_new_tokens=4, budget_covers="all", max_work_mb=0.05)
    app.start(port=0)
    try:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0, timeout=60)
        conv = {"X-Conversation-Id": "mem"}
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], extra_headers=conv)
        st = app.session("mem").stats
        assert (st.budget_covers, st.max_work_bytes, st.budget_bytes) == ("all", int(0.05 * 2**20), int(0.5 * 2**20))
        assert st.max_kv_bytes + st.query_buffer_bytes + st.max_work_bytes <= st.budget_bytes
    finally:
        app.shutdown()
