"""Cartridges: a long document read and compacted once, then mounted into any number of sessions.

A team's documentation or a repository map is read by the model once, compacted offline with
Attention Matching (repeat-prefill queries and per-context head budgets: the default offline path
of ``session.compact``), saved, and mounted as the pinned prefix of new sessions::

    c = Cartridge.build("smollm2-135m", open("guide.md").read(), ratio=0.1)
    c.save("guide.cartridge")
    s = Cartridge.load("guide.cartridge").session(max_kv_mb=16)   # or AgentSession(...).mount(c)
    s.chat("What does the guide say about retries?")

A mounted cartridge's entries are pinned: online compaction never touches them. Every session
gets its own copy of the tensors, so sessions that share a cartridge diverge independently.

File format: the session file of :mod:`agentmem.persist` with ``agentmem.format`` =
``"agentmem-cartridge"``: the full state of the session that read and compacted the document,
plus ``meta["cartridge"]`` (``ratio``, ``tokens``, ``chars``). Mounting uses its memory only
(cache, query buffer, transcript, pending token); the building session's policy and sampler do
not travel.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import persist
from .errors import AgentMemError, BudgetError, SessionFileError
from .events import CompactionEvent
from .identity import check_model
from .units import MiB

if TYPE_CHECKING:
    from .agent import AgentSession


class Cartridge:
    """A compacted document: ``tensors`` and ``meta`` in the format of :mod:`agentmem.persist`."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        for key in ("model", "cache", "session"):
            if not isinstance(meta.get(key), dict):
                raise SessionFileError(f"cartridge metadata lacks {key!r}: build or save the cartridge again")
        self.tensors = tensors
        self.meta = meta

    # ------------------------------------------------------------------ building, files
    @classmethod
    def build(
        cls,
        model: Any,
        text: str,
        ratio: float,
        policy: Any = None,
        *,
        queries: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        tokenizer: Any = None,
    ) -> Cartridge:
        """Read ``text`` into an unbounded session and compact it once to ``ratio`` of its size.

        ``model``: as for :class:`~agentmem.AgentSession` (None = the embedded default).
        ``policy``: its offline path does the compaction (default ``am-halve``: AM, repeat-prefill
        queries, global head budgets); ``queries`` overrides the query source. ``ratio=1`` keeps
        the document exact.
        """
        from .agent import AgentSession

        if not isinstance(text, str) or not text:
            raise ValueError("a cartridge needs non-empty text")
        session = AgentSession(
            model=model, max_kv_mb=None, policy=policy, device=device, dtype=dtype, tokenizer=tokenizer
        )
        session.append(text)
        if ratio < 1:
            session.compact(ratio, queries=queries)
        elif ratio != 1:
            raise ValueError(f"ratio must be in (0, 1] (got {ratio})")
        tensors, meta = session.state()
        meta["cartridge"] = {"ratio": ratio, "tokens": len(session.transcript_ids), "chars": len(text)}
        return cls(tensors, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cartridge to one file, atomically (see :mod:`agentmem.persist`)."""
        return persist.write_file(path, persist.CARTRIDGE, self.tensors, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Cartridge:
        """A cartridge saved by :meth:`save`; :class:`~agentmem.errors.SessionFileError` if damaged."""
        return cls(*persist.read_file(path, persist.CARTRIDGE))

    # ------------------------------------------------------------------ facts
    @property
    def model_name(self) -> str:
        return str(self.meta["model"].get("name"))

    @property
    def tokens(self) -> int:
        """Tokens of the document (the logical length a mounted session starts from)."""
        return len(self.tensors["transcript_ids"])

    @property
    def text(self) -> str:
        """The raw text the cartridge was built from, as the model read it (special tokens included)."""
        return str(self.meta["session"].get("transcript_text", ""))

    @property
    def compaction(self) -> CompactionEvent | None:
        """The compaction that built the cartridge (None if it was kept exact)."""
        events = self.meta["session"].get("compactions") or []
        return CompactionEvent(**events[-1]) if events else None

    def entries(self) -> int:
        """KV entries stored, summed over layers and KV heads."""
        return sum(sum(layer["lengths"]) for layer in self.meta["cache"]["layers"])

    def bytes_needed(self, session: AgentSession) -> int:
        """The ``max_kv_bytes`` with which ``session`` can hold this cartridge and keep reading.

        The cartridge's entries in the session's dtype, plus per head the room the session's policy
        works in beside a pinned prefix of P tokens, in a budget of T tokens: ``min_tokens`` for a
        chunk of up to T/4 tokens (the engine's largest chunk) and a recent window of up to T/4
        (capped by the policy's ``recent`` setting). Solved for the smallest such T; conservative.
        """
        cache, policy = session.cache, session.policy
        layers = self.meta["cache"]["layers"]
        pinned = max((max(m["lengths"]) for m in layers), default=0)
        recent = getattr(policy.config, "recent", None)
        total = pinned + policy.min_tokens(1)
        for _ in range(1000):  # fixed point of a map with slope < 1: converges
            quarter = total // 4
            window = quarter if recent is None else min(quarter, recent)
            want = pinned + policy.min_tokens(max(1, quarter)) + window
            if want <= total:
                break
            total = want
        entries = sum(sum(m["lengths"]) * layer.head_slot_bytes() for m, layer in zip(layers, cache.layers))
        return entries + cache.bytes_for_tokens(total - pinned)

    # ------------------------------------------------------------------ mounting
    def mount(self, session: AgentSession) -> None:
        """Make the cartridge the pinned prefix of ``session``, which must be empty and on the same model.

        Tensors are copied: any number of sessions can mount one cartridge. Raises
        :class:`~agentmem.errors.ModelMismatchError`, :class:`~agentmem.errors.BudgetError` (with the
        budget that would do) or :class:`~agentmem.errors.AgentMemError` (session not empty); the
        session is unchanged when anything fails.
        """
        with session.transaction():
            if len(session.transcript_ids) or session.engine.pending or session.cache.logical_length:
                raise AgentMemError(
                    "a cartridge can only be mounted into an empty session (before anything is read); "
                    "create a new AgentSession and mount it first"
                )
            check_model(self.meta["model"], session.loaded, f"cartridge {self.model_name!r}")
            need = self.bytes_needed(session)
            if session.cache.max_bytes is not None and need > session.cache.max_bytes:
                least = session.engine.budget_for(need)
                raise BudgetError(
                    f"the cartridge holds {self.tokens} tokens as {self.entries()} KV entries; with room for "
                    f"policy {session.policy.name!r} to work beside it, it needs {need / MiB:.2f} MiB of KV: use "
                    f"max_kv_mb >= {math.ceil(least / MiB * 100) / 100:.2f} (the session has "
                    f"{session.max_kv_bytes / MiB:g}), or build the cartridge with a smaller ratio"
                )
            try:
                session.load_state(self.tensors, self.meta, full=False)
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, AgentMemError):
                    raise
                raise SessionFileError(f"the cartridge is damaged ({exc}): build or save it again") from exc
            session.pinned.append((0, len(session.transcript_ids)))

    def session(self, max_kv_mb: float | None = 64, model: Any = None, **kwargs: Any) -> AgentSession:
        """A new :class:`~agentmem.AgentSession` with this cartridge mounted.

        ``model`` defaults to the model named in the cartridge (in the dtype it was built in);
        other keyword arguments go to ``AgentSession``.
        """
        from .agent import AgentSession

        if model is None:
            model = persist.model_source(self.meta["model"], f"the cartridge of {self.model_name!r}")
            kwargs.setdefault("dtype", self.meta["model"].get("dtype"))
        session = AgentSession(model=model, max_kv_mb=max_kv_mb, **kwargs)
        self.mount(session)
        return session
