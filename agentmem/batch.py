"""Several sessions of one model decoding in lockstep: one model call per step for all of them.

:func:`generate_batch` batches sessions; beneath it, :func:`forward_batch` (one model call for
several engines, each row attending over its own cache), :func:`step_batch` and :func:`run_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from .decoding import Decoding, check_generation_args
from .engine import Engine, model_call
from .events import CompactionEvent, GenerationResult
from .kv.batched import BatchedCaches
from .session import Session
from .text import check_messages


def generate_batch(
    sessions: Sequence[Session],
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
    check_generation_args(max_new_tokens, temperature, top_p, stop)
    for p in prompts:
        if isinstance(p, list):
            check_messages(p)
    with ExitStack() as stack:
        for session in sessions:  # every session's call completes, or none changes
            stack.enter_context(session.transaction())
        chats = [isinstance(p, list) for p in prompts]
        if any(chat and not p for chat, p in zip(chats, prompts)):
            raise ValueError("a chat prompt (a list of messages) is empty")
        begun = [s.begin_reply(p) for s, p in zip(sessions, prompts)]
        decodings = [
            s.decoding(ids, max_new_tokens, temperature, top_p, stop, ignore_eos)
            for s, (ids, _) in zip(sessions, begun)
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
                engines = [sessions[b].engine for b in stepping]
                for b, lg in zip(stepping, step_batch(engines, [e.compactions for e in engines])):
                    logits[b] = lg
            for b in active:
                decodings[b].accept(logits[b])
        for s, chat, d, (_, turn) in zip(sessions, chats, decodings, begun):
            s.end_reply(d, turn, chat)
        return [d.result() for d in decodings]


def _prefill_batch(decodings: list[Decoding]) -> list[torch.Tensor | None]:
    """Each decoding's :meth:`Decoding.prefill`, batched where rows read alike: sessions that read
    as many tokens in chunks of one size run their chunks in one model call."""
    logits: list[torch.Tensor | None] = [None] * len(decodings)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, d in enumerate(decodings):
        if d.batchable:
            groups.setdefault((len(d.engine.pending) + len(d.ids), d.engine.chunk_tokens), []).append(b)
        else:
            logits[b] = d.prefill()
    for rows in groups.values():
        if len(rows) == 1:
            logits[rows[0]] = decodings[rows[0]].prefill()
            continue
        engines = [decodings[b].engine for b in rows]
        todo = [e.take(decodings[b].ids) for e, b in zip(engines, rows)]
        for b, lg in zip(rows, run_batch(engines, todo, [e.compactions for e in engines])):
            logits[b] = lg
            decodings[b].prefilled()
    return logits


def forward_batch(
    engines: Sequence[Engine],
    chunks: Sequence[Sequence[int]],
    records: Sequence[list[CompactionEvent] | None],
    keep: str = "last",
) -> list[torch.Tensor | None]:
    """One model call for several engines sharing one model: engine b reads ``chunks[b]`` (all of
    one length n). Room is made in each engine first (trims, positions, compaction: what
    :meth:`Engine.run` does before a chunk), then one forward runs the batch, each row attending
    over its own cache (:class:`~agentmem.kv.batched.BatchedCaches`). Returns each engine's logits per
    ``keep`` ("none", "last" (V,) or "all" (n, V), fp32). A failed call leaves every cache as it was
    before the model call (compactions made to make room stay, as in :meth:`Engine.run`).
    """
    if not engines:
        return []
    loaded = engines[0].loaded
    if any(e.loaded.model is not loaded.model for e in engines):
        raise ValueError("a batched step needs sessions of one model (the same loaded weights)")
    if len({id(e.cache) for e in engines}) != len(engines):
        raise ValueError("a session can appear only once in a batch")
    n = len(chunks[0])
    if n == 0 or any(len(c) != n for c in chunks):
        raise ValueError("every row of a batched call reads the same number of tokens (at least one)")
    caches = [e.cache for e in engines]
    begun = []
    try:
        for engine, cache, record in zip(engines, caches, records):
            begun.append(engine.make_room_and_begin(cache, n, record))
        position_ids = torch.cat([pos for _, pos in begun], dim=0)  # (B, n)
        logits = model_call(loaded, chunks, position_ids, BatchedCaches(caches), keep)
    except BaseException:
        for cache, (snapshot, _) in zip(caches, begun):
            cache.rollback(snapshot)
        raise
    for cache in caches:
        cache.commit_forward(n)
    if keep == "none":
        return [None] * len(engines)
    logits = logits.float()
    return list(logits.unbind(0)) if keep == "all" else list(logits[:, -1].unbind(0))


def step_batch(engines: Sequence[Engine], records: Sequence[list[CompactionEvent] | None]) -> list[torch.Tensor]:
    """Run each engine's pending token(s) in one batched call (as many pending in each); returns
    their next-token logits (V,) and leaves nothing pending."""
    logits = forward_batch(engines, [e.pending for e in engines], records)
    for e in engines:
        e.pending = []
    return logits


def run_batch(
    engines: Sequence[Engine], ids: Sequence[Sequence[int]], records: Sequence[list[CompactionEvent] | None]
) -> list[torch.Tensor | None]:
    """:meth:`Engine.run` (keep="last") of several engines in lockstep: the same chunks, batched.

    Every engine must read as many tokens and use the same ``chunk_tokens`` (so each chunk is what
    it would be alone). Returns each engine's next-token logits (V,), or None if it read nothing.
    """
    if not engines:
        return []
    total, step = len(ids[0]), engines[0].chunk_tokens
    if any(len(x) != total for x in ids) or any(e.chunk_tokens != step for e in engines):
        raise ValueError("run_batch needs rows of one length and one chunk size; group them first")
    last: list[torch.Tensor | None] = [None] * len(engines)
    for start in range(0, total, step):
        final = start + step >= total
        out = forward_batch(engines, [x[start : start + step] for x in ids], records, "last" if final else "none")
        if final:
            last = out
    return last
