"""One generation, token by token: sampling, stop strings, text deltas and typed stream events.

:class:`Decoding` is driven the same way by a session's own loop and by the batched one
(:func:`agentmem.batch.generate_batch`), so a session decodes identically in both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from .engine import Engine
from .events import GenerationResult, GenerationStats, StreamEvent
from .text import IncrementalDetokenizer, check_text, find_stop


class Sampler:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling from a seeded CPU
    generator, so a seeded run is reproducible on any device."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(self, logits: torch.Tensor, temperature: float, top_p: float) -> int:
        if temperature == 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.cpu() / temperature, dim=-1)
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


def check_generation_args(max_new_tokens, temperature, top_p, stop=None) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
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
    ):
        self.engine, self.sampler = engine, sampler
        self.ids = list(ids)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.ignore_eos = ignore_eos
        self.eos = engine.loaded.spec.eos_token_ids
        self.first_event = self.seen = len(engine.compactions)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.generated: list[int] = []
        self.text = ""
        self.finish = "length"
        self.finished = max_new_tokens == 0
        self.steps = 0  # tokens sampled so far
        self.t0 = self.t1 = time.perf_counter()
        self.prefill_seconds = 0.0

    @property
    def batchable(self) -> bool:
        """Whether the prompt is read with a prediction (so several can be read in one batch)."""
        return self.max_new_tokens > 0 and len(self.engine.pending) + len(self.ids) > 0

    def prefill(self) -> torch.Tensor | None:
        """Read the prompt; with tokens to generate, return the logits of what comes next."""
        e = self.engine
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
        token = self.sampler.sample(logits, self.temperature, self.top_p)
        self.steps += 1
        self.generated.append(token)
        self.engine.accept(token)
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

    def _token_event(self, text: str, token: int | None) -> StreamEvent:
        elapsed = time.perf_counter() - self.t1
        count = len(self.generated)
        return StreamEvent(
            kind="token",
            text=text,
            token_id=token,
            generated_tokens=count,
            tokens_per_s=count / elapsed if elapsed > 0 else 0.0,
            kv_bytes=self.engine.cache.kv_bytes,
        )

    def result(self) -> GenerationResult:
        e = self.engine
        return GenerationResult(
            text=self.text,
            token_ids=self.generated,
            finish_reason=self.finish,
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

    def done(self) -> StreamEvent:
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
