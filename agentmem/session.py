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
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch

from .engine import Engine, forward_batch, run_batch
from .errors import AgentMemError, BudgetError
from .events import CompactionEvent, GenerationResult, GenerationStats, SessionStats, StreamEvent
from .kv.cache import CompactedCache
from .kv.positions import PositionConfig
from .models import LoadedModel, load_model, wrap_model
from .policy.planner import Policy
from .policy.presets import resolve_policy
from .recall import Archived, RecallResult
from .text import IncrementalDetokenizer, find_stop
from .units import MiB

if TYPE_CHECKING:
    from pathlib import Path

    from .toolcalls import ToolReceipt

log = logging.getLogger(__name__)


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
        pin_turn: while a chat reply is generated, the user turn it answers stays exact (pinned) if
            it takes at most this share of the budget and the policy keeps room to work (0: never).
            A reasoning run that compacts its own question cannot answer it
            (docs/benchmarks/reasoning.md).
        auto_recall: before :meth:`chat` reads a user turn, the lines of compacted tool outputs that
            best match it are read back exactly (:meth:`recall` of the user's text), as an agent
            calling ``recall`` itself would (docs/benchmarks/agent.md). Off by default: it adds a
            ``recall`` tool message the caller did not send.
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
        pin_turn: float = 0.75,
        auto_recall: bool = False,
    ):
        if max_kv_mb is not None and not max_kv_mb > 0:
            raise BudgetError(f"max_kv_mb must be > 0 (got {max_kv_mb}); use None for an unbounded cache")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
        if not _number(pin_turn) or not 0 <= pin_turn <= 1:
            raise ValueError(f"pin_turn must be a number in [0, 1] (got {pin_turn!r})")
        if not isinstance(auto_recall, bool):
            raise TypeError(f"auto_recall must be True or False (got {auto_recall!r})")
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
        self.archive: list[Archived] = []  # tool outputs in the transcript, searchable by recall()
        self._chat_text = ""  # the chat-rendered text actually read, to extend turn by turn
        self._pending: list[int] = []
        self._started = False  # whether the first token (and BOS) has been read
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._lock = threading.RLock()
        self._depth = 0  # open all-or-nothing operations (_atomic)
        self.pin_turn = pin_turn
        self.auto_recall = auto_recall
        self._held: list[tuple[int, int]] = []  # pins that last until the next reply (hold())

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
        new = resolve_policy(policy)
        with self._lock, self._atomic():
            self.engine.set_policy(new)

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
            query_buffer_bytes=c.query_buffer.nbytes if c.query_buffer is not None else 0,
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

    # ------------------------------------------------------------------ all or nothing
    @contextmanager
    def _atomic(self, undo: bool = False) -> Iterator[None]:
        """An operation that completes or leaves the session exactly as it was: cache, query buffer,
        transcript, pins, pending token, messages, compaction ledger, sampler and policy are put back
        if it raises (``undo=True``: always, for :meth:`score`). A generator closed early (a stream
        the caller stopped reading) keeps what it did. Nested operations belong to the outermost."""
        if self._depth:
            yield
            return
        engine = self.engine
        marks = (
            len(engine.transcript_ids),
            list(engine.pinned),
            len(engine.compactions),
            list(self._pending),
            self._started,
            len(self.messages),
            self._chat_text,
            self.latest_turn,
            self._generator.get_state(),
            engine.policy,
            len(self.archive),
            list(self._held),
        )
        self.cache.begin()
        self._depth += 1
        keep = False
        try:
            yield
            keep = not undo
        except GeneratorExit:
            keep = not undo
            raise
        finally:
            self._depth -= 1
            if keep:
                self.cache.commit()
            else:
                self.cache.abort()
                n_ids, pinned, n_events, pending, started, n_msgs, chat_text, turn, rng, policy, n_archive, held = marks
                del engine.transcript_ids[n_ids:]
                engine.pinned[:] = pinned
                del engine.compactions[n_events:]
                self._pending, self._started, self._chat_text, self.latest_turn = pending, started, chat_text, turn
                del self.messages[n_msgs:]
                self._generator.set_state(rng)
                engine.policy = policy
                del self.archive[n_archive:]
                self._held = held

    def _pinned_tokens(self) -> int:
        return sum(b - a for a, b in self.pinned)

    def _pin_ids(self, n: int) -> None:
        """Pin the next n tokens read; refuses pins that would leave the policy no room to work."""
        cap = self.cache.max_tokens()
        if not self.policy.has_room(cap, self._pinned_tokens() + n, self.engine.chunk_tokens):
            raise BudgetError(
                f"pinning {n} more tokens would leave policy {self.policy.name!r} no room to work: the budget "
                f"holds {cap} tokens, {self._pinned_tokens()} are already pinned; pin less or raise max_kv_mb"
            )
        start = len(self.transcript_ids)
        self.pinned.append((start, start + n))

    def _pin_latest_turn(self) -> tuple[int, int] | None:
        """Pin the latest user turn for the reply being generated (see ``pin_turn``); returns the
        range added to the pins (to remove when the reply is done), or None."""
        turn = self.latest_turn
        if turn is None or turn[1] <= turn[0] or turn in self.pinned or not self.pins_turn(turn[1] - turn[0]):
            return None
        self.pinned.append(turn)
        return turn

    def pins_turn(self, tokens: int) -> bool:
        """Whether a user turn of ``tokens`` tokens stays exact while its reply is generated: at most
        ``pin_turn`` of the budget, and the policy still has room to work next to it."""
        cap = self.cache.max_tokens()
        if self.pin_turn <= 0 or tokens > self.pin_turn * cap:
            return False
        return self.policy.has_room(cap, self._pinned_tokens() + tokens)

    def _unpin(self, turn: tuple[int, int] | None) -> None:
        if turn is not None and turn in self.pinned:
            self.pinned.remove(turn)

    def hold(self, n: int) -> tuple[int, int]:
        """Pin the next ``n`` tokens read until the next reply has been generated (text read back by
        :meth:`recall` stays exact while the model uses it); BudgetError if the policy would have no
        room left. Returns the token range."""
        self._pin_ids(n)
        held = self.pinned[-1]
        self._held.append(held)
        return held

    def _release_held(self) -> None:
        """A reply was generated: what :meth:`hold` kept exact may be compacted again."""
        for held in self._held:
            self._unpin(held)
        self._held = []

    # ------------------------------------------------------------------ public: reading
    def append(self, text: str, role: str | None = None, pin: bool = False) -> None:
        """Read text into memory. ``role`` ("user", "system", "tool", ...) wraps it in the chat template.

        Long inputs are run in chunks; the policy compacts between chunks so the budget holds.
        ``pin=True`` keeps this text exact forever (no policy compacts it), e.g. a system prompt.
        All or nothing: if reading fails, the session is as it was.
        """
        check_text(text, "text")
        if role is not None:
            check_messages([{"role": role, "content": text}])
        with self._lock, self._atomic():
            if role is None:
                ids = self._encode(text)
            else:
                ids = self._chat_ids([{"role": role, "content": text}], add_generation_prompt=False)
            if pin and ids:
                self._pin_ids(len(ids))
            self._read(ids, self.compactions)

    def _token_ids(self, ids: Sequence[int]) -> list[int]:
        if isinstance(ids, (str, bytes)) or not all(isinstance(i, int) or hasattr(i, "__index__") for i in ids):
            raise TypeError("token ids must be a sequence of ints")
        out = [int(i) for i in ids]
        vocab = self.model.get_input_embeddings().num_embeddings
        if any(not 0 <= i < vocab for i in out):
            raise ValueError(f"token ids must be in [0, {vocab})")
        return out

    def append_tokens(self, ids: Sequence[int], pin: bool = False) -> None:
        """Read token ids as they are (no tokenization); see :meth:`append`."""
        ids = self._token_ids(ids)
        with self._lock, self._atomic():
            if pin and ids:
                self._pin_ids(len(ids))
            self._read(ids, self.compactions)

    def next_logits(self) -> torch.Tensor:
        """Run what is pending and return the next-token logits (V,) fp32: a hook for custom samplers.

        Follow it with ``append_tokens([token])`` to accept the chosen token.
        """
        with self._lock, self._atomic():
            if not self._pending:
                raise ValueError("nothing pending: read text (append) or accept a token first")
            return self._step_pending(self.compactions)

    def fork(self) -> AgentSession:
        """An independent session with a copy of this one's memory, sharing the model weights."""
        with self._lock:
            other = copy.copy(self)
            other.engine = self.engine.fork()
            other.messages = copy.deepcopy(self.messages)
            other.archive = list(self.archive)
            other._held = list(self._held)
            other._pending = list(self._pending)
            other._generator = torch.Generator(device="cpu").set_state(self._generator.get_state())
            other._lock = threading.RLock()
            return other

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template's text for ``messages``; a template that cannot render them is an
        AgentMemError naming the model (not jinja's own exception)."""
        extra = {"tools": self.tools} if self.tools else {}
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
            )
        except Exception as exc:  # jinja2's errors, and templates that raise on purpose (role order)
            roles = ", ".join(m["role"] for m in messages[-3:])
            raise AgentMemError(
                f"the chat template of {self.spec.name} cannot render these messages (last roles: {roles}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        check_messages(messages)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise AgentMemError(f"{self.spec.name} has no chat template; use append()/generate() with raw text")
        full = self._render(self.messages + messages, add_generation_prompt)
        if self._chat_text and full.startswith(self._chat_text):
            delta = full[len(self._chat_text) :]
        else:  # first turn, or raw text was read in between: render the new messages alone
            delta = self._render(messages, add_generation_prompt)
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
        _check_generation_args(max_new_tokens, temperature, top_p, stop)
        ids = self._prompt_ids(prompt)
        return self._stream_ids(ids, max_new_tokens, temperature, top_p, stop, ignore_eos)

    def _prompt_ids(self, prompt) -> list[int]:
        if prompt is None:
            if not self._pending:
                raise ValueError("nothing to continue: the session is empty; pass a prompt")
            return []
        check_text(prompt, "prompt")
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

    def _stream_ids(
        self, ids, max_new_tokens, temperature, top_p, stop, ignore_eos=False, chat: list[dict] | None = None
    ) -> Iterator[StreamEvent]:
        """The generation loop. ``chat``: new messages to render (their ids replace ``ids``); the reply
        then joins the history, also when the caller stops reading early (what was generated stays)."""
        with self._lock, self._atomic():
            turn = None
            if chat is not None:
                if self.auto_recall:
                    self._recall_for(chat)
                ids = self._chat_ids(chat, add_generation_prompt=True)
                turn = self._pin_latest_turn() if any(m["role"] == "user" for m in chat) else None
            d = _Decoding(self, ids, max_new_tokens, temperature, top_p, stop, ignore_eos)
            try:
                logits = d.prefill()
                while True:
                    yield from d.compaction_events()
                    if d.finished:
                        break
                    if d.steps > 0:
                        logits = self._step_pending(self.compactions)
                    yield from d.accept(logits)
                if chat is not None:
                    self._record_reply(d.result())
                yield d.done()
            except GeneratorExit:  # the caller stopped reading: a reply cut short is still the reply
                if chat is not None and d.generated and (not self.messages or self.messages[-1]["role"] != "assistant"):
                    self._record_reply(d.result())
                raise
            finally:
                self._unpin(turn)
                if d.generated:
                    self._release_held()

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
        tool_rounds: int = 2,
    ) -> GenerationResult:
        """Add the new turn(s) to the conversation and generate the assistant's reply.

        ``messages`` are the *new* messages (a str is one user message); the history is kept.
        When the built-in ``recall`` tool is offered (``session.tools`` holds
        :data:`agentmem.recall.RECALL_TOOL`) and the reply calls it, the session runs
        :meth:`recall` and lets the model answer again, up to ``tool_rounds`` times; the result is
        the last reply. Other tool calls are the caller's to run (see :mod:`agentmem.toolparse`).
        """
        if not isinstance(tool_rounds, int) or tool_rounds < 0:
            raise ValueError(f"tool_rounds must be an int >= 0 (got {tool_rounds!r})")
        result = self._collect(self.chat_stream(messages, max_new_tokens, temperature, top_p, stop))
        for _ in range(tool_rounds if self._offers_recall() else 0):
            from .toolparse import parse_tool_calls

            queries = [c.arguments.get("query") for c in parse_tool_calls(result.text).calls if c.name == "recall"]
            queries = [q for q in queries if isinstance(q, str) and q.strip()]
            if not queries:
                break
            for q in queries:
                if not self.recall(q).found:  # say so: the model must not wait for lines that never come
                    self.tool_result("recall", f"No earlier tool output matches {q!r}.", ratio=1.0, archive=False)
            result = self._collect(self.chat_stream([], max_new_tokens, temperature, top_p, stop))
        return result

    def _recall_for(self, messages: list[dict]) -> None:
        """auto_recall: read back the lines of compacted tool outputs that match the new user turn."""
        from .recall import compacted_outputs

        query = " ".join(m["content"] for m in messages if m["role"] == "user" and isinstance(m.get("content"), str))
        if query.strip() and compacted_outputs(self):
            self.recall(query)

    def _offers_recall(self) -> bool:
        return any((t.get("function") or {}).get("name") == "recall" for t in self.tools or [] if isinstance(t, dict))

    def chat_stream(self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=None) -> Iterator[StreamEvent]:
        """:meth:`chat`, as a stream of events. ``messages=[]`` asks for the model's turn after the
        chat history already read (e.g. after :meth:`tool_result`)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not (messages or self.messages):
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or one str)")
        check_messages(messages)
        _check_generation_args(max_new_tokens, temperature, top_p, stop)
        return self._stream_ids([], max_new_tokens, temperature, top_p, stop, chat=list(messages))

    def read_messages(self, messages: list[dict]) -> None:
        """Read chat messages into memory without asking for a reply (all or nothing)."""
        check_messages(messages)
        with self._lock, self._atomic():
            self._read(self._chat_ids(list(messages), add_generation_prompt=False), self.compactions)

    def _record_reply(self, result: GenerationResult) -> None:
        """The assistant's reply joins the chat history (and the rendered text read so far)."""
        self.messages.append({"role": "assistant", "content": result.text})
        self._chat_text += self.tokenizer.decode(result.token_ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ public: scoring
    def score(
        self, text: str | Sequence[int], prefix: str | Sequence[int] = "", return_logits: bool = False
    ) -> ScoreResult:
        """Mean NLL per token of ``text`` read after the current memory and ``prefix``; no side effects.

        If the session is empty and there is no prefix, the first token of ``text`` is context only.
        ``text`` and ``prefix`` may be strings or token ids. ``return_logits`` also returns the fp32
        next-token logits that predicted each scored token.
        The text is read exactly as :meth:`append` would read it (compacting if it does not fit),
        then everything is put back: memory, query buffer, transcript and ledger are unchanged.
        """
        if not text:
            raise ValueError("text to score must be non-empty (a str or token ids)")
        for value, what in ((text, "text"), (prefix, "prefix")):
            if isinstance(value, str):
                check_text(value, what)
        with self._lock, self._atomic(undo=True):
            if prefix:
                ctx = self._pending + (self._encode(prefix) if isinstance(prefix, str) else self._token_ids(prefix))
                self._started = True
            else:
                ctx = list(self._pending)
            target = self._encode(text) if isinstance(text, str) else self._token_ids(text)
            if not ctx:
                ctx, target = target[:1], target[1:]
                if not target:
                    raise ValueError("text has a single token and nothing precedes it: nothing to score")
            ids = ctx + target
            self._started = True
            self.transcript_ids.extend(ids[len(self._pending) :])  # read as append() would
            logits = self.engine.run(self.cache, ids, "all", None)
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

    def recall(self, query: str, max_lines: int = 6) -> RecallResult:
        """Read back, exactly, the lines of earlier tool outputs that best match ``query``; see
        :func:`agentmem.recall.recall`."""
        from .recall import recall

        return recall(self, query, max_lines=max_lines)

    def tool(self, fn=None, *, ratio: float | None = None, name: str | None = None):
        """Decorator (``@session.tool`` or ``@session.tool(ratio=0.1)``): calling the function runs it and
        hands its output to :meth:`tool_result`; the call returns the receipt (``.output`` is the text)."""
        from .toolcalls import tool_decorator

        return tool_decorator(self, fn, ratio=ratio, name=name)

    # ------------------------------------------------------------------ public: compaction
    def compact(
        self,
        ratio: float,
        method: str | None = None,
        queries: str | None = None,
        span: tuple[int, int] | None = None,
        reason: str = "manual",
    ) -> CompactionEvent | None:
        """Compact what is in memory now to ``ratio`` of its physical size.

        ``method``: None (the session policy's own), ``"am"`` (Attention Matching), ``"window"``, or
        any policy name (``"h2o"``, ``"snapkv"``, ``"kvzip"``, ``"truncate"``, a preset, ...) whose
        offline path is used once; ``queries``: ``"repeat-prefill"`` (AM's default offline),
        ``"recent"``, ``"context"``, ``"self-study"`` (what the session buffers is what it has).
        ``span=(a, b)``: compact only the entries of transcript tokens a..b-1 (a tool output, e.g.
        ``receipt.span``), to at most ``round(ratio * (b - a))`` per KV head; returns None when they
        are already that few. Sinks and pinned ranges stay exact. Spare capacity is released afterwards.
        """
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1] (got {ratio!r})")
        if span is not None:
            if len(span) != 2 or not 0 <= int(span[0]) <= int(span[1]) <= len(self.transcript_ids):
                raise ValueError(f"span must be (start, end) within the transcript [0, {len(self.transcript_ids)}]")
            span = (int(span[0]), int(span[1]))
        planner = self.policy
        if method is not None and method not in (planner.method.name, planner.name):
            planner = resolve_policy(_METHOD_POLICIES.get(method, method))
            planner.attach(self.spec)
        # the session's sinks stay, whatever method runs (truncate's own online policy keeps none)
        sinks = self.policy.sinks()
        protected = ([(0, sinks)] if sinks else []) + list(self.pinned)
        with self._lock, self._atomic():
            plan = planner.plan_for_ratio(self.cache, ratio, protected, span=span)
            if span is not None and all(r.target_entries >= r.span_entries for r in plan.requests):
                return None
            plan.reason = reason
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


def generate_batch(
    sessions: Sequence[AgentSession],
    prompts: Sequence[str | list[dict] | None],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: str | Sequence[str] | None = None,
    ignore_eos: bool = False,
) -> list[GenerationResult]:
    """Generate for several sessions of one model at once: one model call per step for all of them.

    ``prompts[b]`` is session b's raw-text prompt (as :meth:`AgentSession.generate`), None to
    continue from its memory, or a list of chat messages (as :meth:`AgentSession.chat`). Each
    session reads its prompt on its own, then the sessions decode in lockstep; a session that
    finishes (eos, stop string, length) leaves the batch. Budgets, compactions, sampling and stop
    handling are each session's own, exactly as in its one-by-one ``generate`` / ``chat``; only
    the matrix products are shared (so logits can differ from a one-by-one run by float rounding).
    """
    if len(sessions) != len(prompts):
        raise ValueError(f"{len(sessions)} sessions but {len(prompts)} prompts")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session can appear only once in a batch")
    _check_generation_args(max_new_tokens, temperature, top_p, stop)
    for p in prompts:
        if isinstance(p, list):
            check_messages(p)
    with ExitStack() as locks:
        for session in sessions:
            locks.enter_context(session._lock)
            locks.enter_context(session._atomic())  # every session's call completes, or none changes
        chats = [isinstance(p, list) for p in prompts]
        if any(chat and not p for chat, p in zip(chats, prompts)):
            raise ValueError("a chat prompt (a list of messages) is empty")
        ids = [
            s._chat_ids(list(p), add_generation_prompt=True) if chat else s._prompt_ids(p)
            for s, p, chat in zip(sessions, prompts, chats)
        ]
        turns = [
            s._pin_latest_turn() if chat and any(m["role"] == "user" for m in p) else None
            for s, p, chat in zip(sessions, prompts, chats)
        ]
        decodings = [
            _Decoding(s, i, max_new_tokens, temperature, top_p, stop, ignore_eos) for s, i in zip(sessions, ids)
        ]
        logits = _prefill_batch(decodings)
        active = list(range(len(sessions)))
        while True:
            for b in active:
                decodings[b].compaction_events()
            active = [b for b in active if not decodings[b].finished]
            if not active:
                break
            stepping = [b for b in active if decodings[b].steps > 0]
            if stepping:
                step = forward_batch(
                    [sessions[b].engine for b in stepping],
                    [sessions[b]._pending for b in stepping],
                    [sessions[b].compactions for b in stepping],
                )
                for b, lg in zip(stepping, step):
                    sessions[b]._pending = []
                    logits[b] = lg
            for b in active:
                decodings[b].accept(logits[b])
        results = [d.result() for d in decodings]
        for s, chat, r, turn in zip(sessions, chats, results, turns):
            if chat:
                s._record_reply(r)
            s._unpin(turn)
            if r.token_ids:
                s._release_held()
        return results


def _prefill_batch(decodings: list[_Decoding]) -> list[torch.Tensor | None]:
    """Each decoding's :meth:`_Decoding.prefill`, batched where rows read alike: sessions that read
    as many tokens in chunks of one size run their chunks in one model call."""
    logits: list[torch.Tensor | None] = [None] * len(decodings)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, d in enumerate(decodings):
        s = d.session
        n = len(s._pending) + len(d.ids)
        if d.max_new_tokens > 0 and n > 0:
            groups.setdefault((n, s.engine.chunk_tokens), []).append(b)
        else:
            logits[b] = d.prefill()
    for rows in groups.values():
        if len(rows) == 1:
            logits[rows[0]] = decodings[rows[0]].prefill()
            continue
        todo = []
        for b in rows:
            d, s = decodings[b], decodings[b].session
            todo.append(s._pending + d.ids)
            s._pending, s._started = [], True
            s.transcript_ids.extend(d.ids)
        sessions = [decodings[b].session for b in rows]
        out = run_batch([s.engine for s in sessions], todo, [s.compactions for s in sessions])
        for b, lg in zip(rows, out):
            logits[b] = lg
            decodings[b].prefilled()
    return logits


_METHOD_POLICIES = {"am": "am-halve", "window": "streaming"}  # compact(method=...) by method name


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_generation_args(max_new_tokens, temperature, top_p, stop=None) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (got {max_new_tokens!r})")
    if not _number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (got {temperature!r})")
    if not _number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (got {top_p!r})")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) and x for x in stops)):
        raise ValueError(f"stop must be a non-empty string or a list of them (got {stop!r})")
    for x in stops or ():
        check_text(x, "stop")


def check_text(text, what: str = "text") -> None:
    """A str that can be written as UTF-8 (no lone surrogates), else a clear error."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode: {exc.reason} at index {exc.start} ({text[exc.start : exc.end]!r}); "
            "remove or replace that character"
        ) from None


def check_messages(messages) -> None:
    """Chat messages: dicts with a str ``role`` and a str ``content`` (an assistant message with
    ``tool_calls`` may have None), all valid Unicode."""
    if not isinstance(messages, list):
        raise ValueError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat messages are dicts with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"a message's role must be a non-empty str, got {m['role']!r}")
        content = m["content"]
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            continue
        if not isinstance(content, str):
            raise ValueError(
                f"the content of a {m['role']!r} message must be a str, got {type(content).__name__}"
                + (" (None is only allowed for an assistant message with tool_calls)" if content is None else "")
            )
        check_text(content, f"the content of a {m['role']!r} message")


class _Decoding:
    """The state of one generation: prompt read, tokens sampled, text and stop strings, events.

    The session's own loop (:meth:`AgentSession._stream_ids`) and the batched one
    (:func:`generate_batch`) drive it the same way, so a session decodes identically in both:
    ``prefill()`` once, then per step the next-token logits go to ``accept()`` (which samples,
    makes the token pending and says whether generation is over), ``done()`` at the end.
    """

    def __init__(self, session: AgentSession, ids, max_new_tokens, temperature, top_p, stop, ignore_eos):
        self.session = session
        self.ids = list(ids)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.ignore_eos = ignore_eos
        self.first_event = self.seen = len(session.compactions)
        self.detok = IncrementalDetokenizer(session.tokenizer)
        self.generated: list[int] = []
        self.text = ""
        self.finish = "length"
        self.finished = max_new_tokens == 0
        self.steps = 0  # tokens sampled so far
        self.t0 = self.t1 = time.perf_counter()
        self.prefill_seconds = 0.0

    def prefill(self) -> torch.Tensor | None:
        """Read the prompt; with tokens to generate, return the logits of what comes next."""
        s = self.session
        logits = None
        if self.max_new_tokens > 0:  # read the prompt and predict in one pass
            todo, s._pending, s._started = s._pending + self.ids, [], True
            s.transcript_ids.extend(self.ids)
            logits = s.engine.run(s.cache, todo, "last", s.compactions)
        else:
            s._read(self.ids, s.compactions)
        self.prefilled()
        return logits

    def prefilled(self) -> None:
        """The prompt has been read (here or batched with other sessions): decoding starts now."""
        self.prefill_seconds = time.perf_counter() - self.t0
        self.t1 = time.perf_counter()

    def compaction_events(self) -> list[StreamEvent]:
        s = self.session
        kv = s.cache.kv_bytes
        events = [StreamEvent(kind="compaction", compaction=ev, kv_bytes=kv) for ev in s.compactions[self.seen :]]
        self.seen = len(s.compactions)
        if not self.finished and self.steps == self.max_new_tokens:  # the length limit: flush held-back text
            self.finished = True
            tail = self.detok.flush()
            if tail:
                self.text += tail
                events.append(self._token_event(tail, None))
        return events

    def accept(self, logits: torch.Tensor) -> list[StreamEvent]:
        """Sample the next token from ``logits`` (V,), make it pending; the token's text events."""
        s = self.session
        token = s._sample(logits, self.temperature, self.top_p)
        self.steps += 1
        self.generated.append(token)
        s._pending = [token]
        s.transcript_ids.append(token)
        if token in s.spec.eos_token_ids and not self.ignore_eos:
            self.finish, self.finished = "eos", True
            return []
        delta = self.detok.push(token)
        if not delta:
            return []
        candidate = self.text + delta
        cut = find_stop(candidate, len(self.text), self.stops) if self.stops else None
        if cut is not None:
            delta, candidate = candidate[len(self.text) : cut], candidate[:cut]
            self.finish, self.finished = "stop", True
        self.text = candidate
        return [self._token_event(delta, token)] if delta else []

    def _token_event(self, text: str, token: int | None) -> StreamEvent:
        elapsed = time.perf_counter() - self.t1
        count = len(self.generated)
        return StreamEvent(
            kind="token",
            text=text,
            token_id=token,
            generated_tokens=count,
            tokens_per_s=count / elapsed if elapsed > 0 else 0.0,
            kv_bytes=self.session.cache.kv_bytes,
        )

    def result(self) -> GenerationResult:
        s = self.session
        return GenerationResult(
            text=self.text,
            token_ids=self.generated,
            finish_reason=self.finish,
            stats=GenerationStats(
                prompt_tokens=len(self.ids),
                generated_tokens=len(self.generated),
                prefill_seconds=self.prefill_seconds,
                decode_seconds=time.perf_counter() - self.t1,
                compactions=s.compactions[self.first_event :],
                kv_bytes=s.cache.kv_bytes,
                peak_kv_bytes=s.cache.peak_bytes,
            ),
        )

    def done(self) -> StreamEvent:
        result = self.result()
        return StreamEvent(
            kind="done",
            result=result,
            generated_tokens=len(self.generated),
            kv_bytes=self.session.cache.kv_bytes,
            tokens_per_s=result.stats.decode_tps,
        )


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
