"""Several sessions of one model decoding in lockstep: one model call per step for all of them."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch

from .decoding import Decoding, check_generation_args
from .engine import run_batch, step_batch
from .events import GenerationResult
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
