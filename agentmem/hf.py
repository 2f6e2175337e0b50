"""agentmem inside plain transformers code: ``model.generate`` over a session's budgeted cache.

::

    session = AgentSession(model, tokenizer=tokenizer, max_kv_mb=16)
    with generation(session) as kwargs:
        out = model.generate(input_ids, max_new_tokens=2000, streamer=TextStreamer(tokenizer), **kwargs)

Inside the block every forward of ``model`` that runs on the session's cache is prepared the way
a session prepares its own: before the call the policy makes room (compacting the cache if the
new tokens would not fit ``max_kv_mb``) and the RoPE positions come from the cache; after it the
tokens join the session's transcript. So ``model.generate`` -- any decoding strategy of batch size
1 that uses the cache: greedy, sampling, logits processors, stopping criteria, streamers --
runs for as long as it likes inside the budget. The whole block is one session transaction: if
generation raises, the session is as it was.

``input_ids`` must begin with what the session already holds (its transcript; empty for a new
session): transformers feeds the model only the tokens past the cache's length. The last token
``generate`` returns has not been read: ``session.append_tokens(out[0, -1:])`` before going on
with the session's own API. A prompt longer
than the budget can hold at once is refused (read it with ``session.append`` first and pass the
whole sequence). Beam search and other batch sizes than 1 are not supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .errors import BudgetError
from .session import Session


@contextmanager
def generation(session: Session) -> Iterator[dict]:
    """Hooks ``session.model`` so that ``model.generate(..., **kwargs)`` runs over the session's
    cache within its budget; yields the keyword arguments to pass (the cache)."""
    engine, cache = session.engine, session.cache
    keyword = session.loaded.cache_keyword
    begun: list = []  # (n new tokens, their ids, lengths before) of the forward in flight
    busy = [False]  # making room: the policy's own model calls (scratch passes) are not generate's
    ran = [False]  # whether a forward ran over the cache in the block

    def before(module, args, kwargs):
        if busy[0] or "agentmem_cache" in kwargs:
            return None  # a session's own forward (it prepares itself)
        if kwargs.get(keyword) is not cache and kwargs.get("past_key_values") is not cache:
            return None  # another cache, or none: not ours to prepare
        ids = kwargs.get("input_ids")
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError("agentmem generation takes input_ids of batch size 1 (no beams, no embeddings)")
        n = ids.shape[1]
        position = kwargs.get("cache_position")
        if position is not None and position.numel() and int(position[0]) != len(engine.transcript_ids):
            raise ValueError(
                f"input_ids must begin with the session's transcript ({len(engine.transcript_ids)} tokens); "
                f"transformers fed tokens from position {int(position[0])}"
            )
        if n > cache.max_tokens() // 2 and cache.max_bytes is not None:
            raise BudgetError(
                f"{n} new tokens in one forward are more than half of what max_kv_mb holds ({cache.max_tokens()} "
                "tokens): read the prompt with session.append() first, then pass the whole sequence to generate"
            )
        busy[0] = True
        try:
            engine.make_room(cache, n, session.compactions)
        finally:
            busy[0] = False
        snapshot = cache.snapshot_lengths()
        kwargs["position_ids"] = cache.begin_forward(n)
        kwargs["agentmem_cache"] = cache
        begun.append((n, ids[0].tolist(), snapshot))
        return args, kwargs

    def after(module, args, kwargs, output):
        if not begun or kwargs.get("agentmem_cache") is not cache or busy[0]:
            return None
        n, ids, _ = begun.pop()
        ran[0] = True
        cache.commit_forward(n)
        engine.transcript_ids.extend(ids)
        engine.started = True
        return None

    with session.transaction():
        pending = list(engine.pending)
        if pending:  # the last token read is not in the cache: transformers feeds it again (input_ids)
            del engine.transcript_ids[len(engine.transcript_ids) - len(pending) :]
            engine.pending = []
        hooks = [
            session.model.register_forward_pre_hook(before, with_kwargs=True),
            session.model.register_forward_hook(after, with_kwargs=True),
        ]
        try:  # generate runs under no_grad; inference mode would make tensors the rollback cannot edit
            yield {keyword: cache, "use_cache": True}
        except BaseException:
            while begun:  # a forward that failed half way: its appends go (the transaction does the rest)
                cache.rollback(begun.pop()[2])
            raise
        else:
            if not ran[0] and pending:  # nothing ran over the cache: the pending token stays pending
                engine.transcript_ids.extend(pending)
                engine.pending = pending
        finally:
            for hook in hooks:
                hook.remove()
