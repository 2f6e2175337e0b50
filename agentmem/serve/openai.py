"""OpenAI's wire format: the request bodies agentmem reads (pydantic), the replies it writes, and
errors in OpenAI's shape.

Every field a request may carry is declared here and is either honoured or refused with a 400
that names it (``extra="forbid"``: an unknown field is refused, never silently ignored). Refused
values: ``n`` / ``best_of`` other than 1, ``response_format`` other than ``text`` (no
grammar-constrained decoding), completions' ``suffix``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error"}.get(self.status, "invalid_request_error")
        kind = kind if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ChatMessage(BaseModel):
    """A message of the conversation. Other keys OpenAI clients echo back (``refusal``, ``audio``,
    ``annotations``, ``function_call``) are accepted only when empty."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _no_unread_extras(self) -> ChatMessage:
        for key, value in (self.model_extra or {}).items():
            if value not in (None, "", [], {}):
                raise ValueError(f"message field {key!r} is not supported (only empty values are accepted)")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, description="extension (vLLM): sample among the k most likely")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, description="choices per request: only 1")
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # agentmem extensions
    conversation_id: str | None = Field(default=None, max_length=256)
    max_kv_mb: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _one_choice(self):
        if self.n != 1:
            raise ValueError("n: only 1 choice per request is supported (send n requests)")
        return self


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = Field(default=None, description="accepted; agentmem never stores completions")
    # agentmem extension
    tool_ratio: float | None = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        fmt = (self.response_format or {}).get("type", "text")
        if fmt != "text":
            raise ValueError(
                f"response_format: {fmt!r} is not supported (agentmem has no grammar-constrained decoding); "
                "omit it or use {'type': 'text'} and ask for JSON in the prompt"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if isinstance(self.tool_choice, dict):
            name = (self.tool_choice.get("function") or {}).get("name")
            names = [(t.get("function") or {}).get("name") for t in self.tools or []]
            if self.tool_choice.get("type") != "function" or name not in names:
                raise ValueError(f"tool_choice: names function {name!r}, which is not among the tools {names}")
        return self

    @property
    def forced_tool(self) -> str | None:
        """The function a named ``tool_choice`` forces, if any."""
        return (self.tool_choice.get("function") or {}).get("name") if isinstance(self.tool_choice, dict) else None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (raw text, no chat template; stateless unless a conversation id is given)."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix: insertion (fill in the middle) is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ValueError("prompt: one prompt per request (a list of one string, a string or token ids)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self


# ------------------------------------------------------------------ replies


def chat_logprobs(entries, decode) -> dict | None:
    """OpenAI's ``choices[i].logprobs`` of a chat completion from :class:`~agentmem.events.TokenLogprob` s."""
    if entries is None:
        return None

    def item(tok: int, lp: float) -> dict:
        text = decode(tok)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {
        "content": [dict(item(e.token_id, e.logprob), top_logprobs=[item(t, v) for t, v in e.top]) for e in entries]
    }


def completion_logprobs(entries, decode, offset: int = 0) -> dict | None:
    """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    if entries is None:
        return None
    tokens, offsets, pos = [], [], offset
    for e in entries:
        text = decode(e.token_id)
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{decode(t): v for t, v in e.top} for e in entries],
        "text_offset": offsets,
    }
