"""The HTTP layer of the OpenAI-compatible server: FastAPI routes served by uvicorn.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (``HEAD`` on each
``GET``; ``OPTIONS`` anywhere, and CORS preflights when ``cors_origins`` is set). With ``api_key``
set, every route but ``/health`` needs ``Authorization: Bearer <api_key>`` (401 otherwise).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: malformed JSON or a
field refused 400, unknown model 404, body over ``max_body_bytes`` 413; the server keeps serving.

Each request runs in a thread of its own from start to finish (:class:`Job`), so a conversation's
session is only ever touched by one thread at a time; chunks cross to the event loop through a
queue. A client that disconnects cancels its request at the next token, and the conversation is
put back as it was before the request (:mod:`agentmem.serve.conversations`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..models import LoadedModel
from .conversations import Conversations, ServerConfig
from .openai import APIError, ChatCompletionRequest, CompletionRequest, chat_logprobs, completion_logprobs

log = logging.getLogger("agentmem.serve")

_END = object()


class Job:
    """One request's chunk generator, run start to finish in its own thread; the event loop reads
    its chunks (or the exception it raised) from a queue. :meth:`cancel` asks the generator to stop
    at its next chunk (it raises ``Cancelled`` inside, and the request is rolled back)."""

    def __init__(self, make: Callable[[threading.Event], Iterator[dict]]):
        self.cancelled = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.thread = threading.Thread(target=self._run, args=(make,), name="agentmem-request", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self, make) -> None:
        try:
            for chunk in make(self.cancelled):
                self._put(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop, which decides
            self._put(exc)
        finally:
            self._put(_END)

    async def next(self):
        """The next chunk; _END when the generator is done; raises what the generator raised."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled.set()


def _error(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Gatekeeper:
    """ASGI middleware: the API key (every route but ``/health``), OPTIONS without CORS, request logs.
    Plain ASGI rather than ``@app.middleware``, which would hide client disconnects from the routes."""

    def __init__(self, app, api_key: str | None, cors: bool):
        self.app, self.api_key, self.cors = app, api_key, cors

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if self.api_key and method != "OPTIONS" and path.rstrip("/") != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {self.api_key}":
                message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
                return await _error(APIError(401, message, "invalid_api_key"))(scope, receive, send)
        if method == "OPTIONS" and not self.cors:
            return await Response(status_code=204, headers={"Allow": "GET, HEAD, POST, OPTIONS"})(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info("%s %s %s %.0f ms", method, path, status[0], (time.perf_counter() - t0) * 1e3)


def create_app(conversations: Conversations) -> FastAPI:
    """The FastAPI application serving ``conversations``."""
    cfg = conversations.config
    app = FastAPI(title="agentmem", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gatekeeper, api_key=cfg.api_key, cors=bool(cfg.cors_origins))
    if cfg.cors_origins:  # outermost: preflights are answered before the key is asked for
        app.add_middleware(
            CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["*"], allow_headers=["*"], max_age=600
        )

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:
            return _error(APIError(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"))
        return _error(APIError(exc.status_code, f"no route {request.url.path!r}", "not_found"))

    def model_card() -> dict:
        return {
            "id": conversations.model_id,
            "object": "model",
            "created": conversations.created,
            "owned_by": "agentmem",
        }

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "model": conversations.model_id, "conversations": len(conversations.conversation_ids)}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str):
        if model_id != conversations.model_id:
            raise APIError(404, f"model {model_id!r} does not exist", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, conversations, ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, conversations, CompletionRequest)

    return app


async def _body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    too_large = APIError(413, f"request body is over the limit of {limit} bytes", "request_too_large")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "invalid Content-Length")
        if int(length) > limit:
            raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _serve(request: Request, conversations: Conversations, kind) -> Response:
    cfg = conversations.config
    body = await _body(request, cfg.max_body_bytes)
    conv_header = request.headers.get("x-conversation-id")
    if conv_header is not None and len(conv_header) > cfg.max_header_bytes:
        raise APIError(
            400, f"X-Conversation-Id is longer than {cfg.max_header_bytes} characters", param="X-Conversation-Id"
        )
    req = conversations.parse(body, kind)
    chat = kind is ChatCompletionRequest
    run = conversations.chat if chat else conversations.complete
    job = Job(lambda cancelled: run(req, conv_header, cancelled))
    try:
        await job.next()  # the request's own errors come before its first chunk (a "started" marker)
    except APIError:
        raise
    except (ValueError, TypeError) as exc:
        raise APIError(400, str(exc)) from exc
    except Exception as exc:
        log.exception("request failed")
        raise APIError(500, f"internal error: {type(exc).__name__}: {exc}") from exc
    reply = _Reply(job, conversations, req, chat)
    if req.stream:
        return StreamingResponse(
            reply.events(request), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await reply.whole(request)


class _Reply:
    """Turns a job's chunks into an OpenAI response: one JSON body, or server-sent events."""

    def __init__(self, job: Job, conversations: Conversations, req, chat: bool):
        self.job, self.req, self.chat = job, req, chat
        self.model = conversations.model_id
        self.tokenizer = conversations.loaded.tokenizer
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def decode(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def logprobs(self, entries: list, offset: int = 0) -> dict | None:
        """The request's ``logprobs`` object for these tokens (None when it did not ask)."""
        if self.chat:
            return chat_logprobs(entries, self.decode) if self.req.logprobs else None
        return completion_logprobs(entries, self.decode, offset) if self.req.logprobs is not None else None

    async def _chunks(self) -> AsyncIterator[dict]:
        """The job's chunks until the end."""
        while True:
            item = await self.job.next()
            if item is _END:
                return
            yield item

    async def _watch(self, request: Request) -> None:
        """Cancel the job when the client goes away (a non-streamed reply has nothing to send until
        the end, so the connection is checked on a timer)."""
        while not self.job.cancelled.is_set():
            if await request.is_disconnected():
                self.job.cancel()  # the generator stops at its next token and rolls the request back
                log.info("%s: client disconnected, request cancelled", self.id)
                return
            await asyncio.sleep(0.1)

    async def whole(self, request: Request) -> Response:
        text, calls, lps, final = [], None, [], {}
        watcher = asyncio.ensure_future(self._watch(request))
        try:
            async for c in self._chunks():
                if "delta" in c:
                    text.append(c["delta"])
                elif "tool_calls" in c:
                    calls = c["tool_calls"]
                elif "logprobs" in c:
                    lps += c["logprobs"]
                elif "finish_reason" in c:
                    final = c
        except Exception as exc:
            if self.job.cancelled.is_set():
                return Response(status_code=499)  # nobody is listening; the conversation was rolled back
            log.exception("generation failed")
            return _error(APIError(500, f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            watcher.cancel()
        if self.job.cancelled.is_set():
            return Response(status_code=499)  # nobody is listening; the conversation was rolled back
        base = {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": None}
        if self.chat:
            message = {"role": "assistant", "content": "".join(text) if (text or not calls) else None}
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message, "finish_reason": final.get("finish_reason", "stop")}
            choice["logprobs"] = self.logprobs(lps)
            body = dict(base, object="chat.completion", choices=[choice])
        else:
            echo = len(text[0]) if text and self.req.echo else 0
            choice = {"index": 0, "text": "".join(text), "logprobs": self.logprobs(lps, echo)}
            choice["finish_reason"] = final.get("finish_reason", "stop")
            body = dict(base, object="text_completion", choices=[choice])
        body["usage"], body["agentmem"] = final.get("usage"), final.get("agentmem")
        return JSONResponse(body)

    async def events(self, request: Request) -> AsyncIterator[bytes]:
        req = self.req
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        base = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

        def event(obj: dict) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        def choice(delta: dict | str, finish: str | None = None, logprobs=None) -> bytes:
            if self.chat:
                c = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}
            return event(dict(base, choices=[c]))

        offset, pending_lp, finished = 0, [], False
        try:
            if self.chat:
                yield choice({"role": "assistant", "content": ""})
            async for c in self._chunks():
                if "logprobs" in c:
                    pending_lp += c["logprobs"]
                elif "delta" in c:
                    lp = self.logprobs(pending_lp, offset) if pending_lp else None
                    pending_lp = []
                    offset += len(c["delta"])
                    yield choice({"content": c["delta"]} if self.chat else c["delta"], None, lp)
                elif "tool_calls" in c:
                    calls = [dict(call, index=i) for i, call in enumerate(c["tool_calls"])]
                    yield choice({"tool_calls": calls})
                elif "finish_reason" in c:
                    end = {"delta": {}} if self.chat else {"text": ""}
                    fc = dict(index=0, **end, logprobs=None, finish_reason=c["finish_reason"])
                    yield event(dict(base, choices=[fc], agentmem=c["agentmem"]))
                    if req.stream_options is not None and req.stream_options.include_usage:
                        yield event(dict(base, choices=[], usage=c["usage"]))
            yield b"data: [DONE]\n\n"
            finished = True
        except Exception as exc:
            log.exception("generation failed")
            yield event(APIError(500, f"generation failed: {type(exc).__name__}: {exc}").body())
            yield b"data: [DONE]\n\n"
            finished = True
        finally:  # the client went away (cancelled, or the generator closed): stop and roll back
            if not finished:
                self.job.cancel()


class AgentMemServer(Conversations):
    """The conversations, served over HTTP by uvicorn (in a background thread or in the foreground)."""

    server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _socket: socket.socket | None = None

    def _uvicorn(self, host: str, port: int) -> uvicorn.Server:
        self._socket = socket.create_server((host, port), backlog=256, reuse_port=False)
        config = uvicorn.Config(create_app(self), log_level="warning", lifespan="off", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        return self.server

    def start(self, host: str = "127.0.0.1", port: int = 8000) -> str:
        """Listen in a background thread; returns the base URL (``port=0`` picks a free port)."""
        server = self._uvicorn(host, port)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("the agentmem server did not start")
        return self.url

    @property
    def url(self) -> str:
        assert self._socket is not None
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def serve_forever(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        self._uvicorn(host, port).run(sockets=[self._socket])

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()


def serve(model: LoadedModel | str | None = None, host: str = "127.0.0.1", port: int = 8000, **config) -> None:
    """Load the model and serve until interrupted (``agentmem serve``)."""
    app = AgentMemServer(model, ServerConfig(**config))
    if host not in ("127.0.0.1", "localhost", "::1") and not app.config.api_key:
        log.warning(
            "agentmem serve: listening on %s without --api-key; anyone who can reach it can use the model", host
        )
    print(f"agentmem: serving {app.model_id} on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    app.serve_forever(host, port)
