"""AgentSession: the generation loop that owns a byte-budgeted, compactable KV cache.

The session reads text (``append``), continues it (``generate`` / ``stream``), holds chat turns
(``chat``), scores text without changing itself (``score``) and compacts on demand (``compact``).
Before every model call it makes room: sliding-window layers drop what no query can see, positions
are kept in range (positions.py), and if the next chunk still does not fit the budget the policy
plans a compaction that the method executes. ``kv_bytes`` never exceeds ``max_kv_bytes``.

Invariant: the last token read or sampled is *pending* -- accepted, but not yet run through the
model. The next call runs it first, so there are always logits for what comes next without
storing any.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from .cache import CompactedCache
from .engine import Engine
from .errors import AgentMemError, BudgetError
from .events import CompactionEvent, GenerationResult, GenerationStats, SessionStats, StreamEvent
from .models import LoadedModel, load_model, wrap_model
from .policy import Policy, resolve_policy
from .positions import PositionConfig, maintain_is_noop
from .textstream import IncrementalDetokenizer, find_stop

if TYPE_CHECKING:
    from pathlib import Path

    from .toolcalls import ToolReceipt

log = logging.getLogger(__name__)

MiB = 2**20


class AgentSession:
    """One sequence, one model, one KV cache bounded by ``max_kv_mb`` MiB.

    Args:
        model: ``"smollm2-135m"`` (default), ``"gemma3-270m"``, a local HF directory, a ``.gguf``
            file, a :class:`~agentmem.models.LoadedModel`, or a transformers model (pass ``tokenizer``).
        max_kv_mb: KV budget in MiB (2**20 bytes); None = unbounded.
        policy: a policy name (``"am-halve"``, the default; ``"streaming"``, ``"truncate"``), a preset
            file, a config or a Policy.
        device / dtype: ``"cpu"``, ``"cuda"``, ``"auto"``; dtype defaults to fp32 on CPU, bf16 on CUDA.
        chunk_tokens: longest chunk run through the model at once while reading (capped by the budget).
        positions: how positions stay in range for endless runs (:class:`PositionConfig`).
        seed: seed of the sampler used when ``temperature > 0``.
    """

    def __init__(
        self,
        model=None,
        max_kv_mb: float | None = 64,
        policy=None,
        device: str | None = None,
        dtype=None,
        *,
        tokenizer=None,
        chunk_tokens: int = 256,
        positions: PositionConfig | dict | None = None,
        seed: int = 0,
    ):
        if max_kv_mb is not None and not max_kv_mb > 0:
            raise BudgetError(f"max_kv_mb must be > 0 (got {max_kv_mb}); use None for an unbounded cache")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
        if isinstance(model, LoadedModel):
            self._loaded = model
        elif isinstance(model, torch.nn.Module):
            self._loaded = wrap_model(model, tokenizer)
        else:
            self._loaded = load_model(model, device=device, dtype=dtype)
        if self._loaded.tokenizer is None:
            raise ValueError("a tokenizer is required: pass tokenizer= along with a transformers model")
        self.max_kv_bytes = None if max_kv_mb is None else int(max_kv_mb * MiB)
        self.engine = Engine(
            self._loaded,
            resolve_policy(policy),
            positions if isinstance(positions, PositionConfig) else PositionConfig.model_validate(positions or {}),
            self.max_kv_bytes,
            chunk_tokens,
            seed,
        )
        self.messages: list[dict] = []  # chat history (role/content) seen through chat() / append(role=...)
        self.tools: list[dict] | None = None  # tool schemas (OpenAI format) the chat template renders
        self.latest_turn: tuple[int, int] | None = None  # token range of the latest chat turn with a user message
        self._chat_text = ""  # the chat-rendered text actually read, to extend turn by turn
        self._pending: list[int] = []
        self._started = False  # whether the first token (and BOS) has been read
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> torch.nn.Module:
        return self._loaded.model

    @property
    def tokenizer(self):
        return self._loaded.tokenizer

    @property
    def spec(self):
        return self._loaded.spec

    @property
    def cache(self) -> CompactedCache:
        return self.engine.cache

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @policy.setter
    def policy(self, policy) -> None:
        self.engine.policy = resolve_policy(policy)
        self.engine.policy.attach(self.spec)

    @property
    def positions(self) -> PositionConfig:
        return self.engine.positions

    @property
    def compactions(self) -> list[CompactionEvent]:
        """Every compaction applied to this session's memory, oldest first."""
        return self.engine.compactions

    @property
    def pinned(self) -> list[tuple[int, int]]:
        """Token ranges (transcript indices) that no policy may compact."""
        return self.engine.pinned

    @property
    def transcript_ids(self):
        """Every token read or sampled, in order (compaction never touches it)."""
        return self.engine.transcript_ids

    @property
    def stats(self) -> SessionStats:
        c = self.cache
        return SessionStats(
            kv_bytes=c.kv_bytes,
            payload_bytes=c.payload_bytes,
            peak_kv_bytes=c.peak_bytes,
            max_kv_bytes=self.max_kv_bytes,
            logical_tokens=c.logical_length,
            physical_tokens=c.physical_tokens,
            pending_tokens=len(self._pending),
            position_offset=c.position_offset,
            compactions=list(self.compactions),
            head_budgets=self.policy.budgets_description,
        )

    def transcript(self) -> str:
        """The raw text of everything the session has read or generated (special tokens included)."""
        return self.tokenizer.decode(list(self.transcript_ids), skip_special_tokens=False)

    # ------------------------------------------------------------------ tokens in
    def _encode(self, text: str, chat: bool = False) -> list[int]:
        # BOS (for tokenizers that add one) only at the very start of a raw-text session; chat
        # templates write their own.
        add_special = not self._started and not chat
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _read(self, ids: list[int], record: list[CompactionEvent]) -> torch.Tensor | None:
        """Accept tokens: run pending + all but the last; the last becomes pending."""
        if not ids:
            return None
        todo = self._pending + ids
        self._started = True
        self.transcript_ids.extend(ids)
        logits = self.engine.run(self.cache, todo[:-1], "none", record) if len(todo) > 1 else None
        self._pending = todo[-1:]
        return logits

    def _step_pending(self, record: list[CompactionEvent]) -> torch.Tensor:
        """Run the pending token(s) and return the next-token logits."""
        logits = self.engine.run(self.cache, self._pending, "last", record)
        self._pending = []
        return logits

    # ------------------------------------------------------------------ public: reading
    def append(self, text: str, role: str | None = None, pin: bool = False) -> None:
        """Read text into memory. ``role`` ("user", "system", "tool", ...) wraps it in the chat template.

        Long inputs are run in chunks; the policy compacts between chunks so the budget holds.
        ``pin=True`` keeps this text exact forever (no policy compacts it), e.g. a system prompt.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        with self._lock:
            if role is None:
                ids = self._encode(text)
            else:
                ids = self._chat_ids([{"role": role, "content": text}], add_generation_prompt=False)
            if pin and ids:
                start = len(self.transcript_ids)
                self.pinned.append((start, start + len(ids)))
            self._read(ids, self.compactions)

    def append_tokens(self, ids: Sequence[int], pin: bool = False) -> None:
        """Read token ids as they are (no tokenization); see :meth:`append`."""
        ids = [int(i) for i in ids]
        vocab = self.model.get_input_embeddings().num_embeddings
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        with self._lock:
            if pin and ids:
                start = len(self.transcript_ids)
                self.pinned.append((start, start + len(ids)))
            self._read(ids, self.compactions)

    def next_logits(self) -> torch.Tensor:
        """Run what is pending and return the next-token logits (V,) fp32: a hook for custom samplers.

        Follow it with ``append_tokens([token])`` to accept the chosen token.
        """
        with self._lock:
            if not self._pending:
                raise ValueError("nothing pending: read text (append) or accept a token first")
            return self._step_pending(self.compactions)

    def fork(self) -> AgentSession:
        """An independent session with a copy of this one's memory, sharing the model weights."""
        with self._lock:
            other = copy.copy(self)
            other.engine = self.engine.fork()
            other.messages = copy.deepcopy(self.messages)
            other._pending = list(self._pending)
            other._generator = torch.Generator(device="cpu").set_state(self._generator.get_state())
            other._lock = threading.RLock()
            return other

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat messages are dicts with 'role' and 'content', got {m!r}")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise AgentMemError(f"{self.spec.name} has no chat template; use append()/generate() with raw text")
        extra = {"tools": self.tools} if self.tools else {}
        full = self.tokenizer.apply_chat_template(
            self.messages + messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
        if self._chat_text and full.startswith(self._chat_text):
            delta = full[len(self._chat_text) :]
        else:  # first turn, or raw text was read in between: render the new messages alone
            delta = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
            )
            if self.messages:
                log.debug("chat history is not a prefix of the new rendering; rendering the new turn alone")
        self.messages.extend(copy.deepcopy(messages))
        self._chat_text = full
        ids = self._encode(delta, chat=True)
        if any(m["role"] == "user" for m in messages):  # the caller reads ids next
            self.latest_turn = (len(self.transcript_ids), len(self.transcript_ids) + len(ids))
        return ids

    # ------------------------------------------------------------------ public: generation
    def stream(
        self,
        prompt: str | None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[StreamEvent]:
        """Read ``prompt`` (raw text) and continue it, yielding token, compaction and done events.

        ``prompt=None`` continues from what is already in memory. ``ignore_eos`` keeps generating
        past end-of-sequence tokens (benchmarks, endless reasoning runs).
        """
        _check_generation_args(max_new_tokens, temperature, top_p)
        ids = self._prompt_ids(prompt)
        return self._stream_ids(ids, max_new_tokens, temperature, top_p, stop, ignore_eos)

    def _prompt_ids(self, prompt) -> list[int]:
        if prompt is None:
            if not self._pending:
                raise ValueError("nothing to continue: the session is empty; pass a prompt")
            return []
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or None, not {type(prompt).__name__}")
        if prompt == "":
            raise ValueError("prompt is empty; pass text, or prompt=None to continue from memory")
        return self._encode(prompt)

    def _sample(self, logits: torch.Tensor, temperature: float, top_p: float) -> int:
        if temperature == 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.cpu() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self._generator).item())

    def _stream_ids(self, ids, max_new_tokens, temperature, top_p, stop, ignore_eos=False) -> Iterator[StreamEvent]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        with self._lock:
            first_event = len(self.compactions)
            seen = first_event
            t0 = time.perf_counter()
            if max_new_tokens > 0:  # read the prompt and predict in one pass
                todo, self._pending, self._started = self._pending + ids, [], True
                self.transcript_ids.extend(ids)
                logits = self.engine.run(self.cache, todo, "last", self.compactions)
            else:
                self._read(ids, self.compactions)
            prefill = time.perf_counter() - t0
            detok = IncrementalDetokenizer(self.tokenizer)
            generated: list[int] = []
            text = ""
            finish = "length"
            t1 = time.perf_counter()
            for i in range(max_new_tokens + 1):
                for ev in self.compactions[seen:]:
                    yield StreamEvent(kind="compaction", compaction=ev, kv_bytes=self.cache.kv_bytes)
                seen = len(self.compactions)
                if i == max_new_tokens:
                    tail = detok.flush()
                    text += tail
                    if tail:
                        yield self._token_event(tail, None, len(generated), t1)
                    break
                if i > 0:
                    logits = self._step_pending(self.compactions)
                token = self._sample(logits, temperature, top_p)
                generated.append(token)
                self._pending = [token]
                self.transcript_ids.append(token)
                if token in self.spec.eos_token_ids and not ignore_eos:
                    finish = "eos"
                    break
                delta = detok.push(token)
                if not delta:
                    continue
                candidate = text + delta
                cut = find_stop(candidate, len(text), stops) if stops else None
                if cut is not None:
                    delta, candidate, finish = candidate[len(text) : cut], candidate[:cut], "stop"
                text = candidate
                if delta:
                    yield self._token_event(delta, token, len(generated), t1)
                if finish == "stop":
                    break
            result = GenerationResult(
                text=text,
                token_ids=generated,
                finish_reason=finish,
                stats=GenerationStats(
                    prompt_tokens=len(ids),
                    generated_tokens=len(generated),
                    prefill_seconds=prefill,
                    decode_seconds=time.perf_counter() - t1,
                    compactions=self.compactions[first_event:],
                    kv_bytes=self.cache.kv_bytes,
                    peak_kv_bytes=self.cache.peak_bytes,
                ),
            )
            yield StreamEvent(
                kind="done",
                result=result,
                generated_tokens=len(generated),
                kv_bytes=self.cache.kv_bytes,
                tokens_per_s=result.stats.decode_tps,
            )

    def _token_event(self, text: str, token: int | None, count: int, t_start: float) -> StreamEvent:
        elapsed = time.perf_counter() - t_start
        return StreamEvent(
            kind="token",
            text=text,
            token_id=token,
            generated_tokens=count,
            tokens_per_s=count / elapsed if elapsed > 0 else 0.0,
            kv_bytes=self.cache.kv_bytes,
        )

    @staticmethod
    def _collect(events: Iterator[StreamEvent]) -> GenerationResult:
        result = None
        for ev in events:
            if ev.kind == "done":
                result = ev.result
        assert result is not None
        return result

    def generate(
        self,
        prompt: str | None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Read raw ``prompt`` and continue it; returns text, token ids, finish reason and stats."""
        return self._collect(self.stream(prompt, max_new_tokens, temperature, top_p, stop, ignore_eos))

    def chat(
        self,
        messages: list[dict] | str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
    ) -> GenerationResult:
        """Add the new turn(s) to the conversation and generate the assistant's reply.

        ``messages`` are the *new* messages (a str is one user message); the history is kept.
        """
        return self._collect(self.chat_stream(messages, max_new_tokens, temperature, top_p, stop))

    def chat_stream(self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=None) -> Iterator[StreamEvent]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages:
            raise ValueError("messages is empty")
        _check_generation_args(max_new_tokens, temperature, top_p)
        with self._lock:
            ids = self._chat_ids(list(messages), add_generation_prompt=True)
        return self._chat_events(ids, max_new_tokens, temperature, top_p, stop)

    def _chat_events(self, ids, max_new_tokens, temperature, top_p, stop) -> Iterator[StreamEvent]:
        result = None
        for ev in self._stream_ids(ids, max_new_tokens, temperature, top_p, stop):
            if ev.kind == "done":
                result = ev.result
            yield ev
        reply = result.text
        self.messages.append({"role": "assistant", "content": reply})
        generated = self.tokenizer.decode(result.token_ids, skip_special_tokens=False)
        self._chat_text += generated

    # ------------------------------------------------------------------ public: scoring
    def score(
        self, text: str | Sequence[int], prefix: str | Sequence[int] = "", return_logits: bool = False
    ) -> ScoreResult:
        """Mean NLL per token of ``text`` read after the current memory and ``prefix``; no side effects.

        If the session is empty and there is no prefix, the first token of ``text`` is context only.
        ``text`` and ``prefix`` may be strings or token ids. ``return_logits`` also returns the fp32
        next-token logits that predicted each scored token.
        Text that fits the free budget is scored in place and rolled back; longer text is scored on
        a scratch copy of the cache (which may compact; the session never sees it).
        """
        if not text:
            raise ValueError("text to score must be non-empty (a str or token ids)")
        with self._lock:
            started = self._started
            ctx = self._pending + (self._encode(prefix) if isinstance(prefix, str) and prefix else list(prefix))
            if prefix:
                self._started = True
            target = self._encode(text) if isinstance(text, str) else [int(i) for i in text]
            self._started = started
            if not ctx:
                ctx, target = target[:1], target[1:]
                if not target:
                    raise ValueError("text has a single token and nothing precedes it: nothing to score")
            ids = ctx + target
            cache = self.cache
            if cache.fits(len(ids)) and maintain_is_noop(cache, len(ids), self.positions):
                with self.engine.scratch(cache):
                    logits = self.engine.run(cache, ids, "all", None)
            else:
                logits = self.engine.run(cache.clone(), ids, "all", None)
            pred = logits[len(ctx) - 1 : len(ids) - 1]
            tgt = torch.tensor(target, device=pred.device)
            nll = torch.nn.functional.cross_entropy(pred, tgt, reduction="none")
            return ScoreResult(
                nll=float(nll.mean().item()),
                tokens=len(target),
                token_nll=nll.cpu().tolist(),
                logits=pred if return_logits else None,
            )

    # ------------------------------------------------------------------ public: tools
    def tool_result(
        self, name: str, output: str, ratio: float | None = None, role: str | None = "tool", **kw
    ) -> ToolReceipt:
        """Read a tool's output into memory and compact it right away; see :func:`agentmem.toolcalls.tool_result`."""
        from .toolcalls import tool_result

        return tool_result(self, name, output, ratio=ratio, role=role, **kw)

    def tool(self, fn=None, *, ratio: float | None = None, name: str | None = None):
        """Decorator (``@session.tool`` or ``@session.tool(ratio=0.1)``): calling the function runs it and
        hands its output to :meth:`tool_result`; the call returns the receipt (``.output`` is the text)."""
        from .toolcalls import tool_decorator

        return tool_decorator(self, fn, ratio=ratio, name=name)

    # ------------------------------------------------------------------ public: compaction
    def compact(self, ratio: float, method: str | None = None, queries: str | None = None) -> CompactionEvent:
        """Compact what is in memory now to ``ratio`` of its physical size.

        ``method``: None (the session policy's own), ``"am"`` (Attention Matching), ``"window"``, or
        any policy name (``"h2o"``, ``"snapkv"``, ``"kvzip"``, ``"truncate"``, a preset, ...) whose
        offline path is used once; ``queries``: ``"repeat-prefill"`` (AM's default offline),
        ``"recent"``, ``"context"``, ``"self-study"`` (what the session buffers is what it has).
        Sinks and pinned ranges stay exact. Spare capacity is released afterwards.
        """
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1] (got {ratio})")
        planner = self.policy
        if method is not None and method not in (planner.method.name, planner.name):
            planner = resolve_policy(_METHOD_POLICIES.get(method, method))
            planner.attach(self.spec)
        with self._lock:
            plan = planner.plan_for_ratio(self.cache, ratio, self.pinned)
            groups = getattr(planner.config, "on_policy_groups", 1)
            event = self.engine.execute(self.cache, plan, planner.method, queries, groups, planner=planner)
            self.cache.shrink_to_fit()
            event.kv_bytes_after = self.cache.kv_bytes
            self.compactions.append(event)
            return event

    # ------------------------------------------------------------------ public: persistence
    def save(self, path) -> Path:
        """Write this session to one file, atomically (safetensors + JSON metadata; see agentmem.persist)."""
        from .persist import save_session

        return save_session(self, path)

    @classmethod
    def load(cls, path, model=None, max_kv_mb=..., device=None, **kwargs) -> AgentSession:
        """A session written by :meth:`save`, continuing exactly where it stopped (model=None: the
        model named in the file; max_kv_mb=...: the saved budget); see :func:`agentmem.persist.load_session`."""
        from .persist import load_session

        return load_session(path, model=model, max_kv_mb=max_kv_mb, device=device, **kwargs)

    def mount(self, cartridge) -> AgentSession:
        """Mount a :class:`~agentmem.cartridge.Cartridge` as this empty session's pinned prefix; returns self."""
        cartridge.mount(self)
        return self


_METHOD_POLICIES = {"am": "am-halve", "window": "streaming"}  # compact(method=...) by method name


def _check_generation_args(max_new_tokens, temperature, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (got {max_new_tokens!r})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")


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
