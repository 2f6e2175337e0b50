"""AgentSession: a :class:`~agentmem.session.Session` with what an agent needs on top.

Tool outputs read and compacted on arrival (:meth:`AgentSession.tool_result`, ``@session.tool``),
exact recall of what compaction blurred (:meth:`AgentSession.recall`, the ``recall`` tool the
model may call, ``auto_recall``), files (``save`` / ``load``) and cartridges (``mount``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any

import torch

from . import persist
from .decoding import collect
from .errors import AgentMemError, SessionFileError
from .events import GenerationResult, StreamEvent
from .identity import check_model, dtype_name
from .kv.positions import PositionConfig
from .policy.presets import resolve_policy
from .recall import RecallResult, compacted_outputs, recall
from .session import Session
from .state import SessionFields
from .toolparse import parse_tool_calls
from .tools import ToolReceipt, tool_decorator, tool_result
from .units import MiB

log = logging.getLogger(__name__)


class AgentSession(Session):
    """A session for agents: everything :class:`~agentmem.session.Session` does (its arguments are
    this one's), plus tool outputs, recall and files.

    Args:
        auto_recall: before :meth:`chat` reads a user turn, the lines of compacted tool outputs that
            best match it are read back exactly (:meth:`recall` of the user's text), as an agent
            calling ``recall`` itself would (docs/benchmarks/agent.md). Off by default: it adds a
            ``recall`` tool message the caller did not send.
    """

    def __init__(self, *args, auto_recall: bool = False, **kwargs):
        if not isinstance(auto_recall, bool):
            raise TypeError(f"auto_recall must be True or False (got {auto_recall!r})")
        super().__init__(*args, **kwargs)
        self.auto_recall = auto_recall

    # ------------------------------------------------------------------ chat with recall
    def chat(
        self,
        messages: list[dict] | str,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        tool_rounds: int = 2,
        **options,
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
        result = collect(self.chat_stream(messages, max_new_tokens, temperature, top_p, stop, **options))
        for _ in range(tool_rounds if self._offers_recall() else 0):
            queries = [c.arguments.get("query") for c in parse_tool_calls(result.text).calls if c.name == "recall"]
            queries = [q for q in queries if isinstance(q, str) and q.strip()]
            if not queries:
                break
            for q in queries:
                if not self.recall(q).found:  # say so: the model must not wait for lines that never come
                    self.tool_result("recall", f"No earlier tool output matches {q!r}.", ratio=1.0, archive=False)
            options.pop("seed", None)  # a seed starts the first reply only
            result = collect(self.chat_stream([], max_new_tokens, temperature, top_p, stop, **options))
        return result

    def chat_stream(
        self, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, stop=None, **options
    ) -> Iterator[StreamEvent]:
        """:meth:`chat`, as a stream of events; with ``auto_recall``, matching tool-output lines are
        read back first, in the same all-or-nothing operation as the reply."""
        events = super().chat_stream(messages, max_new_tokens, temperature, top_p, stop, **options)  # validates now
        if not self.auto_recall:
            return events
        new = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        return self._recalling(new, events)

    def _recalling(self, messages: list[dict], events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
        with self.transaction():
            query = " ".join(
                m["content"] for m in messages if m["role"] == "user" and isinstance(m.get("content"), str)
            )
            if query.strip() and compacted_outputs(self):
                self.recall(query)
            yield from events

    def _offers_recall(self) -> bool:
        return any((t.get("function") or {}).get("name") == "recall" for t in self.tools or [] if isinstance(t, dict))

    # ------------------------------------------------------------------ tools
    def tool_result(
        self, name: str, output: str, ratio: float | None = None, role: str | None = "tool", **kw
    ) -> ToolReceipt:
        """Read a tool's output into memory and compact it right away; see :func:`agentmem.tools.tool_result`."""
        return tool_result(self, name, output, ratio=ratio, role=role, **kw)

    def recall(self, query: str, max_lines: int = 6) -> RecallResult:
        """Read back, exactly, the lines of earlier tool outputs that best match ``query``; see
        :func:`agentmem.recall.recall`."""
        return recall(self, query, max_lines=max_lines)

    def tool(self, fn=None, *, ratio: float | None = None, name: str | None = None):
        """Decorator (``@session.tool`` or ``@session.tool(ratio=0.1)``): calling the function runs it and
        hands its output to :meth:`tool_result`; the call returns the receipt (``.output`` is the text)."""
        return tool_decorator(self, fn, ratio=ratio, name=name)

    # ------------------------------------------------------------------ state and files
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        meta["session"]["auto_recall"] = self.auto_recall
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, full: bool = True) -> SessionFields:
        fields = super().load_state(tensors, meta, full)
        if full:
            self.auto_recall = fields.auto_recall
        return fields

    def save(self, path) -> Path:
        """Write this session to one file, atomically (safetensors + JSON metadata; see agentmem.persist)."""
        with self.lock:
            tensors, meta = self.state()
        return persist.write_file(path, persist.SESSION, tensors, meta)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        model: Any = None,
        max_kv_mb: float | None | EllipsisType = ...,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        policy: Any = None,
        tokenizer: Any = None,
        max_work_mb: float | None | EllipsisType = ...,
        budget_covers: str | EllipsisType = ...,
    ) -> AgentSession:
        """A session written by :meth:`save`, continuing exactly where it stopped.

        ``model``: None loads the model named in the file (embedded name or local path); otherwise a
        name, path, LoadedModel or transformers model (with ``tokenizer``), which must be the model the
        session was saved from (:class:`ModelMismatchError` otherwise). ``max_kv_mb``: default the saved
        budget; a budget too small for the saved memory raises BudgetError. ``policy``, ``max_work_mb``
        and ``budget_covers``: default the saved ones. Errors leave nothing behind: either a complete
        session or an exception.
        """
        path = persist.file_path(path)
        tensors, meta = persist.read_file(path, persist.SESSION)
        try:
            saved = meta["model"]
            saved_budget = meta["max_kv_bytes"]
            positions = PositionConfig.model_validate(meta["positions"])
            chosen_policy = resolve_policy(policy if policy is not None else meta["policy"])
            chunk = int(meta["chunk_tokens"])
            if model is None:
                model = persist.model_source(saved, str(path))
                dtype = dtype or saved["dtype"]  # the dtype is part of the config hash (and of exactness)
            budget = (None if saved_budget is None else saved_budget / MiB) if max_kv_mb is ... else max_kv_mb
            if max_work_mb is ...:  # older files carry neither: the defaults
                saved_work = meta.get("max_work_bytes")
                max_work_mb = None if saved_work is None else saved_work / MiB
            if budget_covers is ...:
                budget_covers = meta.get("budget_covers", "kv")
            session = cls(
                model=model,
                max_kv_mb=budget,
                policy=chosen_policy,
                device=device,
                dtype=dtype,
                tokenizer=tokenizer,
                chunk_tokens=max(1, chunk),
                positions=positions,
                max_work_mb=max_work_mb,
                budget_covers=budget_covers,
            )
            check_model(saved, session.loaded, str(path))
            if dtype_name(session.loaded.dtype) != saved.get("dtype"):
                log.warning(
                    "%s: saved in %s, loaded in %s: the continuation is close, not exact",
                    path,
                    saved.get("dtype"),
                    dtype_name(session.loaded.dtype),
                )
            session.load_state(tensors, meta, full=True)
        except AgentMemError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SessionFileError(
                f"{path} is damaged or incomplete ({type(exc).__name__}: {exc}): restore it from a backup "
                "or save the session again"
            ) from exc
        return session

    def mount(self, cartridge) -> AgentSession:
        """Mount a :class:`~agentmem.cartridge.Cartridge` as this empty session's pinned prefix; returns self."""
        cartridge.mount(self)
        return self
