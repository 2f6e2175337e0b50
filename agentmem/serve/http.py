"""The HTTP layer of the OpenAI-compatible server: routing, JSON and server-sent events, body limits.

Built on the standard library's ``ThreadingHTTPServer`` (a thread per request); what a request
does is :class:`~agentmem.serve.conversations.Conversations`'.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..models import LoadedModel
from ..units import MiB
from .conversations import Conversations, Reply, ServerConfig
from .openai import APIError, ChatCompletionRequest

log = logging.getLogger(__name__)


class AgentMemServer(Conversations):
    """The conversations, served over HTTP."""

    httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 8000) -> str:
        """Listen in a background thread; returns the base URL (``port=0`` picks a free port)."""
        self.httpd = _HTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="agentmem-server", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.httpd = _HTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def shutdown(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _make_handler(server: AgentMemServer):
    class Handler(_Handler):
        app = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "agentmem"
    app: AgentMemServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        log.info("%s %s", self.address_string(), format % args)

    # -------------------------------------------------------------- responses
    def _send_json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: APIError, close: bool = False) -> None:
        self._send_json(err.status, err.body(), close)

    # -------------------------------------------------------------- GET
    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        app = self.app
        model = {"id": app.model_id, "object": "model", "created": app.created, "owned_by": "agentmem"}
        if path == "/health":
            self._send_json(200, {"status": "ok", "model": app.model_id, "conversations": len(app.conversation_ids)})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path.startswith("/v1/models/"):
            if path[len("/v1/models/") :] == app.model_id:
                self._send_json(200, model)
            else:
                self._error(APIError(404, f"model {path[len('/v1/models/') :]!r} does not exist", "model_not_found"))
        elif path == "/v1/chat/completions":
            self._error(APIError(405, "use POST for /v1/chat/completions", "method_not_allowed"))
        else:
            self._error(APIError(404, f"no route {path!r}", "not_found"))

    # -------------------------------------------------------------- POST
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise _Close(APIError(411, "send the body with a Content-Length (chunked bodies are not accepted)"))
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise _Close(APIError(400, "invalid Content-Length")) from None
        if length < 0:
            raise _Close(APIError(400, "invalid Content-Length"))
        limit = self.app.config.max_body_bytes
        if length > limit:
            self._drain(length, limit)
            raise _Close(
                APIError(413, f"request body is {length} bytes; the limit is {limit}", "request_too_large"),
            )
        return self.rfile.read(length)

    def _drain(self, length: int, limit: int) -> None:
        """Read (and drop) an oversize body so the client sees the 413, unless it is far too large."""
        if length > max(4 * limit, 64 * MiB):
            return
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._body()
        except _Close as close:
            self._error(close.err, close=True)
            return
        if path != "/v1/chat/completions":
            self._error(APIError(404, f"no route {path!r}", "not_found"))
            return
        try:
            conv_header = self.headers.get("X-Conversation-Id")
            if conv_header is not None and len(conv_header) > self.app.config.max_header_bytes:
                limit = self.app.config.max_header_bytes
                raise APIError(400, f"X-Conversation-Id is longer than {limit} characters", param="X-Conversation-Id")
            req = self.app.parse(body)
            chunks = self.app.chat(req, conv_header)
        except APIError as err:
            self._error(err)
            return
        except (ValueError, TypeError) as exc:
            self._error(APIError(400, str(exc)))
            return
        except Exception as exc:
            log.exception("chat completion failed")
            self._error(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
            return
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        try:
            if req.stream:
                self._stream(chunks, completion_id, created, req)
            else:
                self._complete(chunks, completion_id, created)
        finally:
            chunks.close()

    def _complete(self, chunks: Reply, completion_id: str, created: int) -> None:
        text, last = [], {}
        try:
            for c in chunks:
                if "delta" in c:
                    text.append(c["delta"])
                    if self._client_gone():  # nobody to answer: stop generating (what was read stays)
                        self.close_connection = True
                        return
                else:
                    last = c
        except Exception as exc:
            log.exception("generation failed")
            self._error(APIError(500, f"generation failed: {type(exc).__name__}: {exc}"))
            return
        self._send_json(
            200,
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": self.app.model_id,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "logprobs": None,
                        "finish_reason": last.get("finish_reason", "stop"),
                    }
                ],
                "usage": last.get("usage"),
                "agentmem": last.get("agentmem"),
            },
        )

    def _stream(self, chunks: Reply, completion_id: str, created: int, req: ChatCompletionRequest) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": self.app.model_id}
        base["system_fingerprint"] = None

        def choice(delta: dict, finish: str | None) -> dict:
            return dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

        try:
            self._event(choice({"role": "assistant", "content": ""}, None))
            for c in chunks:
                if "delta" in c:
                    self._event(choice({"content": c["delta"]}, None))
                    continue
                self._event(dict(choice({}, c["finish_reason"]), agentmem=c["agentmem"]))
                if req.stream_options is not None and req.stream_options.include_usage:
                    self._event(dict(base, choices=[], usage=c["usage"]))
            self._write(b"data: [DONE]\n\n")
            self._write(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left: generation stops (the conversation keeps what it read)
        except Exception as exc:
            log.exception("generation failed")
            try:
                self._event(APIError(500, f"generation failed: {type(exc).__name__}: {exc}").body())
                self._write(b"data: [DONE]\n\n")
                self._write(b"")
            except OSError:
                pass
            self.close_connection = True

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (readable with nothing to read)."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, obj: dict) -> None:
        self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write(self, data: bytes) -> None:
        """One chunk of the chunked response (empty: the terminating chunk)."""
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    """A thread per request; a listen backlog for bursts of clients (the stdlib's default is 5)."""

    request_queue_size = 256
    daemon_threads = True


class _Close(Exception):
    def __init__(self, err: APIError):
        super().__init__(err.message)
        self.err = err


def serve(
    model: LoadedModel | str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    **config,
) -> None:
    """Load the model and serve until interrupted (``agentmem serve``)."""
    app = AgentMemServer(model, ServerConfig(**config))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("agentmem serve: listening on %s; anyone who can reach it can use the model", host)
    print(f"agentmem: serving {app.model_id} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    app.serve_forever(host, port)
