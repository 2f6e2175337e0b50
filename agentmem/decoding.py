"""One generation, token by token: sampling, stop strings, text deltas and typed stream events.

:class:`Decoding` is driven the same way by a session's own loop and by the batched one
(:func:`agentmem.batch.generate_batch`), so a session decodes identically in both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from .engine import Engine
from .events import GenerationResult, GenerationStats, StreamEvent, TokenLogprob
from .text import IncrementalDetokenizer, check_text, find_stop


@dataclass(frozen=True)
class Options:
    """What a generation may ask for beyond temperature and top-p (OpenAI's and transformers' names).

    ``top_k``: sample among the k most likely tokens (0: all). ``presence_penalty`` /
    ``frequency_penalty``: OpenAI's, over the tokens generated in this reply (subtracted once per
    token seen / per occurrence). ``logit_bias``: token id -> bias added to its logit.
    ``logits_processor``: transformers ``LogitsProcessor`` s, called as ``p(input_ids (1, T),
    scores (1, V))`` with every token of the sequence so far. ``logprobs``: report each generated
    token's log-probability and this many alternatives (0: the token's only). ``seed``: reseed
    the session's sampler first. ``streamer``: a transformers streamer (``put`` / ``end``), given
    each generated token. ``prefix``: text the reply starts with, read as part of the prompt (it
    is in the reply's text; e.g. the opening of a forced tool call).
    """

    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logits_processor: tuple = ()
    logprobs: int | None = None
    seed: int | None = None
    streamer: Any = None
    prefix: str = ""

    @classmethod
    def from_kwargs(cls, kwargs: dict, vocab: int) -> Options:
        """Checked options from a call's keyword arguments; a clear error for anything unknown or out of range."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            known = ", ".join(f.name for f in fields(cls))
            raise TypeError(f"unknown generation option(s) {', '.join(map(repr, unknown))}; known: {known}")
        o = dict(kwargs)
        top_k = o.get("top_k", 0)
        if not is_int(top_k) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (got {top_k!r})")
        for name in ("presence_penalty", "frequency_penalty"):
            if name in o and (not is_number(o[name]) or not -2 <= o[name] <= 2):
                raise ValueError(f"{name} must be a number in [-2, 2] (got {o[name]!r})")
        bias = o.get("logit_bias") or {}
        if not isinstance(bias, dict):
            raise ValueError("logit_bias must be a dict of token id -> bias")
        pairs = []
        for k, v in bias.items():
            tok = int(k) if isinstance(k, (int, str)) and str(k).lstrip("-").isdigit() else None
            if tok is None or not 0 <= tok < vocab or not is_number(v) or not -100 <= v <= 100:
                raise ValueError(
                    f"logit_bias maps token ids in [0, {vocab}) to numbers in [-100, 100] (got {k!r}: {v!r})"
                )
            pairs.append((tok, float(v)))
        o["logit_bias"] = tuple(pairs)
        procs = o.get("logits_processor") or ()
        procs = tuple(procs) if hasattr(procs, "__iter__") else (procs,)
        if not all(callable(f) for f in procs):
            raise TypeError("logits_processor must be a callable or a list of them (transformers LogitsProcessor)")
        o["logits_processor"] = procs
        lp = o.get("logprobs")
        if lp is not None and (not is_int(lp) or not 0 <= lp <= 20):
            raise ValueError(f"logprobs must be None or an int in [0, 20] (got {lp!r})")
        seed = o.get("seed")
        if seed is not None and not is_int(seed):
            raise ValueError(f"seed must be an int (got {seed!r})")
        streamer = o.get("streamer")
        if streamer is not None and not (hasattr(streamer, "put") and hasattr(streamer, "end")):
            raise TypeError("streamer must have put() and end() (a transformers streamer)")
        if not isinstance(o.get("prefix", ""), str):
            raise TypeError("prefix must be a str")
        return cls(**o)

    @property
    def shapes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.logits_processor)


class Sampler:
    """Greedy at temperature 0, else temperature + top-k + nucleus (top-p) sampling from a seeded CPU
    generator, so a seeded run is reproducible on any device."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(self, logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> int:
        if temperature == 0:
            return int(torch.argmax(logits).item())
        logits = logits.cpu()
        if 0 < top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator).item())

    def fork(self) -> Sampler:
        """An independent sampler in the same state."""
        other = Sampler()
        other.generator.set_state(self.generator.get_state())
        return other


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_generation_args(max_new_tokens, temperature, top_p, stop=None) -> None:
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (got {max_new_tokens!r})")
    if not is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (got {temperature!r})")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (got {top_p!r})")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) and x for x in stops)):
        raise ValueError(f"stop must be a non-empty string or a list of them (got {stop!r})")
    for x in stops or ():
        check_text(x, "stop")


class Decoding:
    """The state of one generation: prompt read, tokens sampled, text and stop strings, events.

    The session's own loop and the batched one drive it the same way: ``prefill()`` once (or the
    batch reads the prompt and calls ``prefilled()``), then per step the next-token logits go to
    ``accept()`` (which samples, makes the token pending and says whether generation is over),
    ``done()`` at the end.
    """

    def __init__(
        self,
        engine: Engine,
        sampler: Sampler,
        tokenizer,
        ids: Sequence[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: str | Sequence[str] | None,
        ignore_eos: bool,
        options: Options | None = None,
    ):
        self.engine, self.sampler = engine, sampler
        self.options = options = options or Options()
        self.prefix_ids = (
            list(tokenizer(options.prefix, add_special_tokens=False)["input_ids"]) if options.prefix else []
        )
        self.ids = list(ids) + self.prefix_ids
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.ignore_eos = ignore_eos
        self.eos = engine.loaded.spec.eos_token_ids
        self.first_event = self.seen = len(engine.compactions)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.generated: list[int] = []
        self.text = options.prefix
        self.logprobs: list[TokenLogprob] | None = [] if options.logprobs is not None else None
        self.reported = 0  # logprob entries already handed out in token events
        self.finish = "length"
        self.finished = max_new_tokens == 0
        self.steps = 0  # tokens sampled so far
        self.t0 = self.t1 = time.perf_counter()
        self.prefill_seconds = 0.0
        self.closed = False

    @property
    def batchable(self) -> bool:
        """Whether the prompt is read with a prediction (so several can be read in one batch)."""
        return self.max_new_tokens > 0 and len(self.engine.pending) + len(self.ids) > 0

    def prefill(self) -> torch.Tensor | None:
        """Read the prompt; with tokens to generate, return the logits of what comes next."""
        e = self.engine
        if self.options.streamer is not None:  # transformers' streamers take the prompt first (skip_prompt)
            self.options.streamer.put(torch.tensor([self.ids], dtype=torch.long))
        logits = None
        if self.max_new_tokens > 0:  # read the prompt and predict in one pass
            logits = e.predict(self.ids, e.compactions)
        else:
            e.read(self.ids, e.compactions)
        self.prefilled()
        return logits

    def prefilled(self) -> None:
        """The prompt has been read (here or batched with other sessions): decoding starts now."""
        self.prefill_seconds = time.perf_counter() - self.t0
        self.t1 = time.perf_counter()

    def compaction_events(self) -> list[StreamEvent]:
        e = self.engine
        kv = e.cache.kv_bytes
        events = [StreamEvent(kind="compaction", compaction=ev, kv_bytes=kv) for ev in e.compactions[self.seen :]]
        self.seen = len(e.compactions)
        if not self.finished and self.steps == self.max_new_tokens:  # the length limit: flush held-back text
            self.finished = True
            tail = self.detok.flush()
            if tail:
                self.text += tail
                events.append(self._token_event(tail, None))
        return events

    def accept(self, logits: torch.Tensor) -> list[StreamEvent]:
        """Sample the next token from ``logits`` (V,), make it pending; the token's text events."""
        o = self.options
        if o.shapes_logits:
            logits = self._shape(logits)
        token = self.sampler.sample(logits, self.temperature, self.top_p, o.top_k)
        if self.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(lp, o.logprobs) if o.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            self.logprobs.append(TokenLogprob(token, float(lp[token]), alts))
        self.steps += 1
        self.generated.append(token)
        self.engine.accept(token)
        if o.streamer is not None:
            o.streamer.put(torch.tensor([token]))
        if token in self.eos and not self.ignore_eos:
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

    def _shape(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit bias, OpenAI's penalties over this reply's tokens, then the logits processors."""
        o = self.options
        logits = logits.clone()
        for tok, bias in o.logit_bias:
            logits[tok] += bias
        if self.generated and (o.presence_penalty or o.frequency_penalty):
            ids = torch.tensor(self.generated, device=logits.device)
            counts = torch.bincount(ids, minlength=logits.numel()).to(logits.dtype)
            logits -= o.frequency_penalty * counts + o.presence_penalty * (counts > 0).to(logits.dtype)
        if o.logits_processor:
            seq = torch.tensor([list(self.engine.transcript_ids)], dtype=torch.long, device=logits.device)
            scores = logits[None]
            for proc in o.logits_processor:
                scores = proc(seq, scores)
            logits = scores[0]
        return logits

    def _token_event(self, text: str, token: int | None) -> StreamEvent:
        elapsed = time.perf_counter() - self.t1
        count = len(self.generated)
        lps = None
        if self.logprobs is not None:
            lps, self.reported = self.logprobs[self.reported :], len(self.logprobs)
        return StreamEvent(
            kind="token",
            text=text,
            token_id=token,
            generated_tokens=count,
            tokens_per_s=count / elapsed if elapsed > 0 else 0.0,
            kv_bytes=self.engine.cache.kv_bytes,
            logprobs=lps,
        )

    def result(self) -> GenerationResult:
        e = self.engine
        return GenerationResult(
            text=self.text,
            token_ids=self.generated,
            finish_reason=self.finish,
            logprobs=self.logprobs,
            stats=GenerationStats(
                prompt_tokens=len(self.ids),
                generated_tokens=len(self.generated),
                prefill_seconds=self.prefill_seconds,
                decode_seconds=time.perf_counter() - self.t1,
                compactions=e.compactions[self.first_event :],
                kv_bytes=e.cache.kv_bytes,
                peak_kv_bytes=e.cache.peak_bytes,
            ),
        )

    def close(self) -> None:
        """The generation is over (done, failed or abandoned): a streamer is told, once."""
        if self.options.streamer is not None and not self.closed:
            self.options.streamer.end()
        self.closed = True

    def done(self) -> StreamEvent:
        self.close()
        result = self.result()
        return StreamEvent(
            kind="done",
            result=result,
            generated_tokens=len(self.generated),
            kv_bytes=self.engine.cache.kv_bytes,
            tokens_per_s=result.stats.decode_tps,
        )


def collect(events) -> GenerationResult:
    """The result of a stream of events (its ``done`` event)."""
    result = None
    for ev in events:
        if ev.kind == "done":
            result = ev.result
    if result is None:
        raise RuntimeError("the stream ended without a done event")
    return result
