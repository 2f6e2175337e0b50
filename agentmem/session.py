"""Session: one sequence, one model, one byte-budgeted KV cache that compacts itself.

The session reads text (``append``), continues it (``generate`` / ``stream``), holds chat turns
(``chat``), scores text without changing itself (``score``) and compacts on demand (``compact``).
Tokens go in and logits come out through the :class:`~agentmem.engine.Engine`, which makes room
before every model call: sliding-window layers drop what no query can see, positions are kept in
range, and if the next chunk still does not fit the budget the policy plans a compaction that
the method executes. ``kv_bytes`` never exceeds ``max_kv_bytes``.

Every operation is all or nothing (:meth:`Session.transaction`): it completes, or the session is
as it was -- cache, query buffer, transcript, pins, pending token, messages, ledger, sampler.
:class:`~agentmem.agent.AgentSession` adds tool outputs, recall and files on top.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ._version import __version__
from .decoding import Decoding, Options, Sampler, check_generation_args, collect, is_number
from .engine import Engine
from .errors import AgentMemError, BudgetError, PinRefused
from .events import Archived, CompactionEvent, GenerationResult, ScoreResult, SessionStats, StreamEvent
from .heap import release_freed_memory
from .identity import model_identity
from .kv.cache import CompactedCache
from .kv.positions import PositionConfig
from .models import LoadedModel, load_model, wrap_model
from .policy.planner import Policy
from .policy.presets import resolve_policy
from .state import SessionFields, parse_session, sub
from .text import check_messages, check_text
from .units import MiB

log = logging.getLogger(__name__)

_METHOD_POLICIES = {"am": "am-halve", "window": "streaming"}  # compact(method=...) by method name


class Session:
    """One sequence, one model, one KV cache bounded by ``max_kv_mb`` MiB.

    Args:
        model: ``"smollm2-135m"`` (default), ``"gemma3-270m"``, ``"qwen2.5-coder-0.5b"``, a local HF
            directory, a ``.gguf`` file, a :class:`~agentmem.models.LoadedModel`, or a transformers
            model (pass ``tokenizer``).
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
        max_work_mb: bound on the memory one compaction holds beside the cache at once (scratch-pass
            queries, score blocks, fit batches, replacement blocks before they are written): batches
            shrink to fit it (same results, slower), repeat-prefill / self-study queries are capped
            at half of it (fewer queries, lower recall: docs/benchmarks/memory.md). None: with
            ``budget_covers="kv"`` no bound (batches of 8-16 MiB, ``query_tokens`` queries; the
            amount is reported in ``stats.peak_work_bytes``), with ``"all"`` a third of what the
            query buffer leaves of the budget.
        budget_covers: ``"kv"`` (default): ``max_kv_mb`` bounds the cache; the query buffer and the
            compaction work are extra, reported in :attr:`stats`. ``"all"``: ``max_kv_mb`` bounds the
            cache + query buffer + compaction work together (the cache gets what the other two leave).
            What a running operation keeps to undo itself (layers as they were) is outside either.
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
        max_work_mb: float | None = None,
        budget_covers: str = "kv",
    ):
        if max_kv_mb is not None and not max_kv_mb > 0:
            raise BudgetError(f"max_kv_mb must be > 0 (got {max_kv_mb}); use None for an unbounded cache")
        if max_work_mb is not None and not (is_number(max_work_mb) and max_work_mb > 0):
            raise BudgetError(f"max_work_mb must be a number > 0 (got {max_work_mb!r}); use None for the default")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
        if not is_number(pin_turn) or not 0 <= pin_turn <= 1:
            raise ValueError(f"pin_turn must be a number in [0, 1] (got {pin_turn!r})")
        if isinstance(model, LoadedModel):
            loaded = model
        elif isinstance(model, torch.nn.Module):
            loaded = wrap_model(model, tokenizer)
        else:
            loaded = load_model(model, device=device, dtype=dtype)
        if loaded.tokenizer is None:
            raise ValueError("a tokenizer is required: pass tokenizer= along with a transformers model")
        self.max_kv_bytes = None if max_kv_mb is None else int(max_kv_mb * MiB)
        self.engine = Engine(
            loaded,
            resolve_policy(policy),
            positions if isinstance(positions, PositionConfig) else PositionConfig.model_validate(positions or {}),
            self.max_kv_bytes,
            chunk_tokens,
            seed,
            max_work_bytes=None if max_work_mb is None else int(max_work_mb * MiB),
            budget_covers=budget_covers,
        )
        self.messages: list[dict] = []  # chat history (role/content) seen through chat() / append(role=...)
        self.tools: list[dict] | None = None  # tool schemas (OpenAI format) the chat template renders
        self.latest_turn: tuple[int, int] | None = None  # token range of the latest chat turn with a user message
        self.archive: list[Archived] = []  # tool outputs in the transcript, searchable by recall
        self.pin_turn = pin_turn
        self.sampler = Sampler(seed)
        self.lock = threading.RLock()  # held by every operation; hold it to make several one
        self._chat_text = ""  # the chat-rendered text actually read, to extend turn by turn
        self._reply_at: int | None = None  # where the last reply starts in _chat_text
        self._depth = 0  # open all-or-nothing operations (transaction)
        self._held: list[tuple[int, int]] = []  # pins that last until the next reply (hold())

    # ------------------------------------------------------------------ properties
    @property
    def loaded(self) -> LoadedModel:
        return self.engine.loaded

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.loaded.model

    @property
    def tokenizer(self):
        return self.engine.loaded.tokenizer

    @property
    def spec(self):
        return self.engine.loaded.spec

    @property
    def cache(self) -> CompactedCache:
        return self.engine.cache

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    @policy.setter
    def policy(self, policy) -> None:
        new = resolve_policy(policy)
        with self.transaction():
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
    def held(self) -> list[tuple[int, int]]:
        """The pinned ranges :meth:`hold` keeps exact until the next reply (a copy)."""
        return list(self._held)

    @property
    def chat_text(self) -> str:
        """The chat-template text read so far (what the next turn's rendering must extend)."""
        return self._chat_text

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
            max_kv_bytes=c.max_bytes,
            logical_tokens=c.logical_length,
            physical_tokens=c.physical_tokens,
            pending_tokens=len(self.engine.pending),
            position_offset=c.position_offset,
            compactions=list(self.compactions),
            head_budgets=self.policy.budgets_description,
            query_buffer_bytes=c.query_buffer.nbytes if c.query_buffer is not None else 0,
            peak_work_bytes=max((e.work_bytes for e in self.compactions), default=0),
            max_work_bytes=self.engine.work_limit,
            budget_bytes=self.max_kv_bytes,
            budget_covers=self.engine.budget.covers,
            peak_undo_bytes=c.peak_undo_bytes,
            undo_device=c.undo_device.type,
        )

    def transcript(self) -> str:
        """The raw text of everything the session has read or generated (special tokens included)."""
        return self.tokenizer.decode(list(self.transcript_ids), skip_special_tokens=False)

    # ------------------------------------------------------------------ tokens in
    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text`` as this session reads it: BOS (for tokenizers that add one) only at
        the very start of a raw-text session; chat templates write their own (``chat=True``)."""
        add_special = not self.engine.started and not chat
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def read_ids(self, ids: Sequence[int]) -> None:
        """Read token ids made by :meth:`encode` or :meth:`render_chat` into memory (compacting as
        the budget requires). Call it inside :meth:`transaction` with what rendered them."""
        self.engine.read(list(ids), self.compactions)

    # ------------------------------------------------------------------ all or nothing
    @contextmanager
    def transaction(self, undo: bool = False) -> Iterator[None]:
        """Hold the session and make what runs inside one operation: it completes, or the session
        is put back exactly as it was (cache, query buffer, transcript, pins, pending token,
        messages, ledger, sampler, policy) if it raises; ``undo=True``: always (:meth:`score`). A
        generator closed early (a stream the caller stopped reading) keeps what it did. Nested
        transactions belong to the outermost."""
        with self.lock:
            if self._depth:
                if undo:  # no savepoints: what an inner undo would put back is the outer operation's
                    raise AgentMemError(
                        "score() cannot run inside another operation (an open stream or transaction): "
                        "finish or close it first, or score on session.fork()"
                    )
                yield
                return
            marks = (
                self.engine.mark(),
                len(self.messages),
                self._chat_text,
                self.latest_turn,
                self.sampler.generator.get_state(),
                len(self.archive),
                list(self._held),
                self.tools,
                self._reply_at,
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
                    (
                        engine,
                        n_msgs,
                        self._chat_text,
                        self.latest_turn,
                        rng,
                        n_archive,
                        self._held,
                        self.tools,
                        self._reply_at,
                    ) = marks
                    self.engine.restore(engine)
                    del self.messages[n_msgs:]
                    self.sampler.generator.set_state(rng)
                    del self.archive[n_archive:]

    # ------------------------------------------------------------------ pins
    def _pinned_tokens(self) -> int:
        return sum(b - a for a, b in self.pinned)

    def _pin_ids(self, n: int) -> None:
        """Pin the next n tokens read; refuses pins that would leave the policy no room to work."""
        cap = self.cache.max_tokens()
        if not self.policy.has_room(cap, self._pinned_tokens() + n, self.engine.chunk_tokens):
            raise PinRefused(
                f"pinning {n} more tokens would leave policy {self.policy.name!r} no room to work: the budget "
                f"holds {cap} tokens, {self._pinned_tokens()} are already pinned; pin less or raise max_kv_mb"
            )
        start = len(self.transcript_ids)
        self.pinned.append((start, start + n))

    def pins_turn(self, tokens: int) -> bool:
        """Whether a user turn of ``tokens`` tokens stays exact while its reply is generated: at most
        ``pin_turn`` of the budget, and the policy still has room to work next to it."""
        cap = self.cache.max_tokens()
        if self.pin_turn <= 0 or tokens > self.pin_turn * cap:
            return False
        return self.policy.has_room(cap, self._pinned_tokens() + tokens)

    def hold(self, n: int) -> tuple[int, int]:
        """Pin the next ``n`` tokens read until the next reply has been generated (text read back by
        recall stays exact while the model uses it); BudgetError if the policy would have no
        room left. Returns the token range."""
        self._pin_ids(n)
        held = self.pinned[-1]
        self._held.append(held)
        return held

    def _unpin(self, turn: tuple[int, int] | None) -> None:
        if turn is not None and turn in self.pinned:
            self.pinned.remove(turn)

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
        with self.transaction():
            if role is None:
                ids = self.encode(text)
                if pin and ids:
                    self._pin_ids(len(ids))
            else:  # pinned while rendering: a refused pin records nothing
                ids = self.render_chat([{"role": role, "content": text}], add_generation_prompt=False, pin=pin)
            self.read_ids(ids)

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
        with self.transaction():
            if pin and ids:
                self._pin_ids(len(ids))
            self.read_ids(ids)

    def next_logits(self) -> torch.Tensor:
        """Run what is pending and return the next-token logits (V,) fp32: a hook for custom samplers.

        Follow it with ``append_tokens([token])`` to accept the chosen token.
        """
        with self.transaction():
            if not self.engine.pending:
                raise ValueError("nothing pending: read text (append) or accept a token first")
            return self.engine.predict([], self.compactions)

    def fork(self):
        """An independent session with a copy of this one's memory, sharing the model weights."""
        with self.lock:
            other = copy.copy(self)
            other.engine = self.engine.fork()
            other.messages = copy.deepcopy(self.messages)
            other.archive = list(self.archive)
            other._held = list(self._held)
            other.sampler = self.sampler.fork()
            other.lock = threading.RLock()
            other._depth = 0  # a fork taken inside an operation is not inside it
            return other

    # ------------------------------------------------------------------ chat rendering
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

    def renders(self, message: dict) -> bool:
        """Whether the chat template renders ``message`` (its content appears) after the history."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return False
        probe = dict(message, content="\u2063agentmem-probe\u2063")
        extra = {"tools": self.tools} if self.tools else {}
        try:
            text = self.tokenizer.apply_chat_template(self.messages + [probe], tokenize=False, **extra)
        except Exception:  # templates raise on roles they do not know or on role order
            return False
        return probe["content"] in text

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool, hold: bool = False, pin: bool = False
    ) -> list[int]:
        """The token ids that extend what was read with ``messages`` through the chat template; the
        messages join the history (read the ids next, in the same :meth:`transaction`). ``hold``:
        the ids are held exact until the next reply (:meth:`hold`); ``pin``: kept exact for good.
        When the hold or pin is refused (BudgetError) nothing is recorded, so a caller inside a
        larger operation can go on without it."""
        check_messages(messages)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise AgentMemError(f"{self.spec.name} has no chat template; use append()/generate() with raw text")
        full = self._render(self.messages + messages, add_generation_prompt)
        if self._chat_text and full.startswith(self._chat_text):
            delta = full[len(self._chat_text) :]
        elif self._reply_at is not None and full.startswith(self._chat_text[: self._reply_at]):
            # the last reply was read further than its message says (a stop string cut it): go on from
            # where the template's rendering of the history departs from what was read
            delta = full[len(os.path.commonprefix([full, self._chat_text])) :]
        else:  # first turn, or raw text was read in between: render the new messages alone
            delta = self._render(messages, add_generation_prompt)
            if self.messages:
                log.debug("chat history is not a prefix of the new rendering; rendering the new turn alone")
        ids = self.encode(delta, chat=True)
        if hold:
            self.hold(len(ids))
        elif pin and ids:
            self._pin_ids(len(ids))
        self.messages.extend(copy.deepcopy(messages))
        self._chat_text = full
        if any(m["role"] == "user" for m in messages):  # the caller reads ids next
            self.latest_turn = (len(self.transcript_ids), len(self.transcript_ids) + len(ids))
        return ids

    # ------------------------------------------------------------------ replies
    def _prompt_ids(self, prompt) -> list[int]:
        if prompt is None:
            if not self.engine.pending:
                raise ValueError("nothing to continue: the session is empty; pass a prompt")
            return []
        check_text(prompt, "prompt")
        if prompt == "":
            raise ValueError("prompt is empty; pass text, or prompt=None to continue from memory")
        return self.encode(prompt)

    def begin_reply(self, prompt: str | list[dict] | None) -> tuple[list[int], tuple[int, int] | None]:
        """Inside a :meth:`transaction`: the ids a reply reads first -- a raw-text prompt, None (go on
        from memory) or new chat messages (rendered into the history) -- and the user turn pinned
        while the reply is generated (to pass to :meth:`end_reply`)."""
        if not isinstance(prompt, list):
            return self._prompt_ids(prompt), None
        ids = self.render_chat(prompt, add_generation_prompt=True)
        turn = self.latest_turn
        if not any(m["role"] == "user" for m in prompt) or turn is None or turn[1] <= turn[0]:
            return ids, None
        if turn in self.pinned or not self.pins_turn(turn[1] - turn[0]):
            return ids, None
        self.pinned.append(turn)
        return ids, turn

    def end_reply(self, decoding: Decoding, turn: tuple[int, int] | None, chat: bool) -> None:
        """A reply is over: a chat reply joins the history (unless nothing was generated because
        the caller stopped reading first), the turn pinned for it is released, and so is what
        :meth:`hold` kept for it."""
        d = decoding
        if chat and (d.generated or d.finished):
            self._reply_at = len(self._chat_text)
            self.messages.append({"role": "assistant", "content": d.text})
            self._chat_text += self.tokenizer.decode(d.prefix_ids + d.generated, skip_special_tokens=False)
        self._unpin(turn)
        if d.generated:
            for held in self._held:
                self._unpin(held)
            self._held = []

    def decoding(self, ids, max_new_tokens, temperature, top_p, stop, ignore_eos, options=None) -> Decoding:
        """The state of one generation after reading ``ids`` (see :class:`~agentmem.decoding.Decoding`)."""
        args = (max_new_tokens, temperature, top_p, stop, ignore_eos, options)
        return Decoding(self.engine, self.sampler, self.tokenizer, ids, *args)

    def options(self, kwargs: dict) -> Options | None:
        """Checked generation options (:class:`~agentmem.decoding.Options`) from keyword arguments."""
        if not kwargs:
            return None
        return Options.from_kwargs(kwargs, self.model.get_input_embeddings().num_embeddings)

    def _stream(
        self, ids, chat: list[dict] | None, max_new_tokens, temperature, top_p, stop, ignore_eos=False, options=None
    ) -> Iterator[StreamEvent]:
        """The generation loop. ``chat``: new messages to render (their ids replace ``ids``); the reply
        then joins the history, also when the caller stops reading early (what was generated stays)."""
        with self.transaction():
            turn = None
            if chat is not None:
                ids, turn = self.begin_reply(chat)
            if options is not None and options.seed is not None:
                self.sampler.generator.manual_seed(options.seed)
            d = self.decoding(ids, max_new_tokens, temperature, top_p, stop, ignore_eos, options)
            ended = False
            try:
                logits = d.prefill()
                while True:
                    yield from d.compaction_events()
                    if d.finished:
                        break
                    if d.steps > 0:
                        logits = self.engine.predict([], self.compactions)
                    yield from d.accept(logits)
                self.end_reply(d, turn, chat is not None)
                ended = True
                yield d.done()
            finally:  # the caller stopped reading: a reply cut short is still the reply
                d.close()
                if not ended:
                    self.end_reply(d, turn, chat is not None)

    # ------------------------------------------------------------------ public: generation
    def stream(
        self,
        prompt: str | None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        **options,
    ) -> Iterator[StreamEvent]:
        """Read ``prompt`` (raw text) and continue it, yielding token, compaction and done events.

        ``prompt=None`` continues from what is already in memory. ``ignore_eos`` keeps generating
        past end-of-sequence tokens (benchmarks, endless reasoning runs). ``options``: ``top_k``,
        ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logits_processor``,
        ``logprobs``, ``seed``, ``streamer`` (transformers' ``TextStreamer``), ``prefix``
        (see :class:`~agentmem.decoding.Options`).
        """
        check_generation_args(max_new_tokens, temperature, top_p, stop)
        opts = self.options(options)
        ids = self._prompt_ids(prompt)
        return self._stream(ids, None, max_new_tokens, temperature, top_p, stop, ignore_eos, opts)

    def stream_tokens(
        self,
        ids: Sequence[int],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        **options,
    ) -> Iterator[StreamEvent]:
        """:meth:`stream` of a prompt given as token ids (read as they are, no tokenization)."""
        check_generation_args(max_new_tokens, temperature, top_p, stop)
        opts = self.options(options)
        ids = self._token_ids(ids)
        if not ids and not self.engine.pending:
            raise ValueError("nothing to continue: the session is empty; pass token ids")
        return self._stream(ids, None, max_new_tokens, temperature, top_p, stop, ignore_eos, opts)

    def generate(
        self,
        prompt: str | None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        **options,
    ) -> GenerationResult:
        """Read raw ``prompt`` and continue it; returns text, token ids, finish reason and stats
        (``options``: as :meth:`stream`)."""
        return collect(self.stream(prompt, max_new_tokens, temperature, top_p, stop, ignore_eos, **options))

    def chat(
        self,
        messages: list[dict] | str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        **options,
    ) -> GenerationResult:
        """Add the new turn(s) to the conversation and generate the assistant's reply.

        ``messages`` are the *new* messages (a str is one user message); the history is kept.
        ``options``: as :meth:`stream`.
        """
        return collect(self.chat_stream(messages, max_new_tokens, temperature, top_p, stop, **options))

    def chat_stream(
        self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=None, **options
    ) -> Iterator[StreamEvent]:
        """:meth:`chat`, as a stream of events. ``messages=[]`` asks for the model's turn after the
        chat history already read (e.g. after a tool output)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not (messages or self.messages):
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or one str)")
        check_messages(messages)
        check_generation_args(max_new_tokens, temperature, top_p, stop)
        opts = self.options(options)
        return self._stream([], list(messages), max_new_tokens, temperature, top_p, stop, False, opts)

    def read_messages(self, messages: list[dict]) -> None:
        """Read chat messages into memory without asking for a reply (all or nothing)."""
        check_messages(messages)
        with self.transaction():
            self.read_ids(self.render_chat(list(messages), add_generation_prompt=False))

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
        engine = self.engine
        with self.transaction(undo=True):
            pending = list(engine.pending)
            if prefix:
                ctx = pending + (self.encode(prefix) if isinstance(prefix, str) else self._token_ids(prefix))
                engine.started = True
            else:
                ctx = list(pending)
            target = self.encode(text) if isinstance(text, str) else self._token_ids(text)
            if not ctx:
                ctx, target = target[:1], target[1:]
                if not target:
                    raise ValueError("text has a single token and nothing precedes it: nothing to score")
            ids = ctx + target
            engine.started = True
            self.transcript_ids.extend(ids[len(pending) :])  # read as append() would
            logits = engine.run(self.cache, ids, "all", None)
            pred = logits[len(ctx) - 1 : len(ids) - 1]
            tgt = torch.tensor(target, device=pred.device)
            nll = torch.nn.functional.cross_entropy(pred, tgt, reduction="none")
            return ScoreResult(
                nll=float(nll.mean().item()),
                tokens=len(target),
                token_nll=nll.cpu().tolist(),
                logits=pred if return_logits else None,
            )

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
        are already that few. Sinks and pinned ranges stay exact. Spare capacity is released afterwards,
        and so is the heap memory the compaction freed (glibc: :func:`agentmem.heap.release_freed_memory`).
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
        with self.transaction():
            plan = planner.plan_for_ratio(self.cache, ratio, protected, span=span)
            if span is not None and all(r.target_entries >= r.span_entries for r in plan.requests):
                return None
            plan.reason = reason
            event = self.engine.compact(
                self.cache,
                plan,
                planner.method,
                self.compactions,
                source=queries,
                groups=planner.on_policy_groups,
                planner=planner,
            )
        release_freed_memory()  # the scratch pass, the scores and the old layers are freed: give back their pages
        return event

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to continue this session exactly, as ``(tensors, meta)`` in the layout
        of a session file (:mod:`agentmem.state`); the session serialises itself, :mod:`agentmem.persist` writes."""
        with self.lock:
            engine, cache = self.engine, self.cache
            cache_t, cache_m = cache.state()
            tensors = {f"cache.{k}": v for k, v in cache_t.items()}
            qb_meta = None
            if cache.query_buffer is not None:
                qb_t, qb_meta = cache.query_buffer.state()
                tensors.update({f"query_buffer.{k}": v for k, v in qb_t.items()})
            tensors["transcript_ids"] = torch.tensor(list(engine.transcript_ids), dtype=torch.int32)
            tensors["sampler_rng"] = self.sampler.generator.get_state()
            st = self.stats
            meta = {
                "model": model_identity(self.loaded),
                "cache": cache_m,
                "query_buffer": qb_meta,
                "policy": self.policy.config.model_dump(mode="json"),
                "positions": self.positions.model_dump(mode="json"),
                "max_kv_bytes": self.max_kv_bytes,
                "max_work_bytes": engine.budget.work,
                "budget_covers": engine.budget.covers,
                "chunk_tokens": engine.chunk_tokens,
                "session": {
                    "pending": list(engine.pending),
                    "started": engine.started,
                    "messages": self.messages,
                    "chat_text": self._chat_text,
                    "tools": self.tools,
                    "latest_turn": self.latest_turn,
                    "pinned": [list(r) for r in engine.pinned],
                    "pin_turn": self.pin_turn,
                    "auto_recall": False,
                    "archive": [[a.name, a.start, a.end] for a in self.archive],
                    "held": [list(r) for r in self._held],
                    "compactions": [e.as_dict() for e in engine.compactions],
                    "transcript_text": self.transcript(),
                },
                "stats": {
                    "kv_bytes": st.kv_bytes,
                    "payload_bytes": st.payload_bytes,
                    "logical_tokens": st.logical_tokens,
                    "physical_tokens": st.physical_tokens,
                },
                "agentmem_version": __version__,
            }
            return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, full: bool = True) -> SessionFields:
        """Put a :meth:`state` into this session (whose model has been checked); returns the parsed
        session fields.

        ``full=False`` (cartridges) restores memory only: cache, query buffer, transcript and pending
        token; messages, sampler, ledger and pins stay the session's own. Everything is validated
        before the session changes; raises ValueError / KeyError / TypeError for a malformed state.
        """
        fields = parse_session(tensors, meta, self.model.get_input_embeddings().num_embeddings)
        engine, cache = self.engine, self.cache
        qb, qb_meta = cache.query_buffer, meta.get("query_buffer")
        cache.load_state(sub(tensors, "cache."), meta["cache"])  # validates everything before writing
        if qb is not None and qb_meta is not None:
            try:
                qb.load_state(sub(tensors, "query_buffer."), qb_meta)
            except ValueError as exc:
                if full and self.policy.config.model_dump(mode="json") == meta.get("policy"):
                    raise
                log.info("saved query buffer not restored (%s); it refills as the session reads", exc)
        if not full:  # the building session's peak is not this session's
            cache.peak_bytes = cache.kv_bytes
        engine.transcript_ids = fields.transcript
        engine.pending, engine.started = fields.pending, fields.started
        if full:
            engine.compactions = fields.compactions
            engine.pinned = fields.pinned
            self.pin_turn = fields.pin_turn
            self.archive = fields.archive
            self._held = fields.held
            self.messages = fields.messages
            self._chat_text = fields.chat_text
            self.tools, self.latest_turn = fields.tools, fields.latest_turn
            self.sampler.generator.set_state(fields.rng.clone())
            if self.max_kv_bytes == meta.get("max_kv_bytes") and isinstance(meta.get("chunk_tokens"), int):
                engine.chunk_tokens = max(1, meta["chunk_tokens"])
        return fields
