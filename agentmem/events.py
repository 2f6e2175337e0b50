"""Typed records the session hands back: compaction receipts, stream events, results, scores and stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

from .units import MiB


@dataclass
class CompactionEvent:
    """One compaction: what was compacted, how much memory it freed and what it cost."""

    reason: str  # "budget" (the next step would not fit), "manual" (session.compact), "tool", ...
    policy: str
    method: str
    logical_tokens: int  # tokens seen when it happened
    tokens_before: float  # physical tokens (entries per layer and KV head, averaged)
    tokens_after: float
    kv_bytes_before: int
    kv_bytes_after: int
    payload_bytes_before: int
    payload_bytes_after: int
    seconds: float
    queries: str | None = None  # reference query source used by the fit (None: the method needs none)
    fit_output_error: float | None = None  # mean relative error of the fitted attention output
    fit_mass_error: float | None = None  # mean relative error of the fitted attention mass
    notes: list[str] = field(default_factory=list)
    # seconds per phase ("queries": generating reference queries, "scores": ranking entries,
    # "fits": beta and value fits, "write": validating and writing the cache); ``seconds`` is all of it
    phases: dict[str, float] = field(default_factory=dict)
    work_bytes: int = 0  # most held beside the cache: queries, scores or fit batch, replacements (estimate)
    work_limit: int | None = None  # what bounded work_bytes (the session's max_work_bytes; None: unbounded)
    span_tokens: float = 0.0  # entries it replaced per layer and KV head, averaged (the span it compacted)

    def as_dict(self) -> dict:
        return asdict(self)

    def receipt(self) -> str:
        fit = ""
        if self.fit_output_error is not None:
            fit = f", fit error {self.fit_output_error:.3f} (output) / {self.fit_mass_error:.3f} (mass)"
        return (
            f"[agentmem] compacted ({self.reason}, {self.method}): {self.tokens_before:.0f} -> "
            f"{self.tokens_after:.0f} tokens, {self.payload_bytes_before / MiB:.2f} -> "
            f"{self.payload_bytes_after / MiB:.2f} MiB payload, {self.seconds * 1e3:.0f} ms{fit}"
        )


@dataclass
class SessionStats:
    """Memory and position state of a session. Bytes are exact; MiB = 2**20 bytes."""

    kv_bytes: int  # every byte the cache holds (keys, values, beta, positions, padding, spare capacity)
    payload_bytes: int  # bytes of entries in use
    peak_kv_bytes: int  # highest kv_bytes so far, counting buffers being re-allocated
    max_kv_bytes: int | None  # what bounds kv_bytes: the budget, less what it covers beside the cache
    logical_tokens: int  # tokens read into the cache so far
    physical_tokens: float  # entries per (layer, KV head), averaged
    pending_tokens: int  # tokens accepted but not yet run through the model (the last one read or sampled)
    position_offset: int  # total re-basing shift: next RoPE position = logical_tokens - position_offset
    compactions: list[CompactionEvent] = field(default_factory=list)
    head_budgets: str = "uniform"  # how compactions share entries between KV heads (and the profile used)
    query_buffer_bytes: int = 0  # reference queries kept for online compaction, beside the cache
    peak_work_bytes: int = 0  # the most a compaction held beside the cache (queries, scores, fits, replacements)
    max_work_bytes: int | None = None  # the bound on work_bytes of one compaction (None: unbounded)
    budget_bytes: int | None = None  # the session's max_kv_mb in bytes
    budget_covers: str = "kv"  # "kv": budget_bytes bounds the cache; "all": cache + query buffer + work
    peak_undo_bytes: int = 0  # most held to undo an operation (layers as they were before it), beside the cache
    undo_device: str = "cpu"  # where that lives (host memory for a CUDA cache: copies)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compactions: list[CompactionEvent] = field(default_factory=list)
    kv_bytes: int = 0
    peak_kv_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


FinishReason = Literal["eos", "stop", "length"]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None  # per generated token, when asked for (``logprobs=``)


@dataclass
class StreamEvent:
    """Yielded by ``AgentSession.stream``. ``kind`` is "token", "compaction" or "done"; ``text`` is
    always a string (empty for compaction events) so ``print(ev.text, end="")`` just works."""

    kind: Literal["token", "compaction", "done"]
    text: str = ""
    token_id: int | None = None
    generated_tokens: int = 0
    tokens_per_s: float = 0.0
    kv_bytes: int = 0
    compaction: CompactionEvent | None = None
    result: GenerationResult | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens this event covers, when asked for


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (after logit bias, penalties and
    logits processors, before temperature / top-p / top-k), and the ``top`` most likely tokens."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Archived:
    """A tool output in the transcript: its name and token range (the text is decoded from there)."""

    name: str
    start: int
    end: int


class ScoreResult:
    """``nll``: mean negative log-likelihood (nats/token) of the scored text; ``token_nll`` per token;
    ``logits`` (tokens, vocab) fp32 when asked for."""

    __slots__ = ("nll", "tokens", "token_nll", "logits")

    def __init__(self, nll: float, tokens: int, token_nll: list[float], logits: torch.Tensor | None = None):
        self.nll, self.tokens, self.token_nll, self.logits = nll, tokens, token_nll, logits

    def __repr__(self) -> str:
        return f"ScoreResult(nll={self.nll:.4f}, tokens={self.tokens})"

    def __float__(self) -> float:
        return self.nll
