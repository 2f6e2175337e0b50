"""Exact recall on demand: working memory is lossy, the transcript is not.

Compaction keeps a few entries per tool output, but the session's transcript keeps every token id
(4 bytes a token, against 24-45 KiB of KV). :func:`recall` searches the archived tool outputs (the
transcript spans :func:`~agentmem.tools.tool_result` read) for the lines that best match a
query, and reads those lines back into memory, exactly, as a ``tool`` message named ``recall``:
the model then sees them as fresh text. The budget holds as for any read (older memory is
compacted to make room). :data:`RECALL_TOOL` is the OpenAI-format schema of the same thing as a
tool the model can call itself.

Line search: query terms (identifiers, numbers, words of 3+ characters) are matched against each
line, case-insensitively; a line scores the sum of the inverse document frequency of the terms it
holds (rare terms, such as an ID, weigh most), with a bonus for the query's longest term found as
is. The best lines are returned with a line of context on either side, in the output's order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import PinRefused
from .events import Archived
from .session import Session
from .text import check_text
from .tools import ToolReceipt, span_entries, tool_result

RECALL_TOOL = {
    "type": "function",
    "function": {
        "name": "recall",
        "description": (
            "Re-read, word for word, the lines of earlier tool outputs that match a query (IDs, names, "
            "numbers, error messages). Use it when you need an exact detail you read before."
        ),
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "what to look for"}},
            "required": ["query"],
        },
    },
}

_TERM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.:/]*[A-Za-z0-9]|[0-9]")
_STOP = frozenset(
    "the and for with what which that this from was were are is was did does into than then when where who "
    "answer only number name line output tool show give tell find value".split()
)


@dataclass
class RecallResult:
    """What :func:`recall` found and read back."""

    query: str
    hits: list[tuple[str, int, int]] = field(default_factory=list)  # (output name, first line, last line), 1-based
    text: str = ""  # what was read back into memory ("" when nothing matched)
    receipt: ToolReceipt | None = None
    held: bool = True  # kept exact until the next reply (False: the budget could not hold it next to the pins)

    @property
    def found(self) -> bool:
        return bool(self.text)


def terms(text: str) -> list[str]:
    """The query's search terms, lower-cased, stop words and 1-2 letter words left out."""
    out = []
    for t in _TERM.findall(text):
        t = t.lower().strip(".:/-")
        if t and t not in _STOP and (len(t) >= 3 or t.isdigit()):
            out.append(t)
    return list(dict.fromkeys(out))


def best_lines(lines: list[str], query: str, k: int) -> list[int]:
    """Indices of the (at most) ``k`` lines that best match ``query`` (score > 0), best first."""
    q = terms(query)
    if not q or not lines:
        return []
    low = [line.lower() for line in lines]
    df = {t: sum(t in line for line in low) for t in q}
    n = len(lines)
    idf = {t: math.log((n + 1) / (df[t] + 0.5)) for t, c in df.items() if c}
    longest = max(q, key=len)
    scored = []
    for i, line in enumerate(low):
        s = sum(w for t, w in idf.items() if t in line)
        if s > 0:
            s += 0.5 * idf.get(longest, 0.0) if longest in line else 0.0
            scored.append((-s, i))
    return [i for _, i in sorted(scored)[:k]]


def compacted_outputs(session: Session) -> list[Archived]:
    """The archived tool outputs of which memory keeps fewer entries than tokens (recall can help)."""
    return [a for a in session.archive if span_entries(session.cache, a.start, a.end) < a.end - a.start]


def search(session: Session, query: str, max_lines: int = 6, context: int = 1) -> tuple[str, list]:
    """The excerpt of archived outputs that answers ``query`` best, and its (name, first, last) hits."""
    outputs = []
    for a in session.archive:
        text = session.tokenizer.decode(list(session.transcript_ids[a.start : a.end]), skip_special_tokens=True)
        outputs.append((a, text.splitlines()))
    flat = [(oi, li, line) for oi, (_, lines) in enumerate(outputs) for li, line in enumerate(lines)]
    best = best_lines([line for _, _, line in flat], query, max_lines)
    if not best:
        return "", []
    keep: dict[int, set[int]] = {}
    for j in best:
        oi, li, _ = flat[j]
        n = len(outputs[oi][1])
        keep.setdefault(oi, set()).update(range(max(0, li - context), min(n, li + context + 1)))
    parts, hits = [], []
    for oi in sorted(keep):
        a, lines = outputs[oi]
        rows = sorted(keep[oi])
        runs: list[list[int]] = []
        for r in rows:  # consecutive lines form one run
            if runs and r == runs[-1][-1] + 1:
                runs[-1].append(r)
            else:
                runs.append([r])
        for run in runs:
            hits.append((a.name, run[0] + 1, run[-1] + 1))
            parts.append(f"[{a.name}, lines {run[0] + 1}-{run[-1] + 1}]\n" + "\n".join(lines[r] for r in run))
    return "\n".join(parts), hits


def recall(session: Session, query: str, max_lines: int = 6, context: int = 1) -> RecallResult:
    """Find the lines of earlier tool outputs that match ``query`` and read them back into memory
    exactly (a ``tool`` message named ``recall``), kept exact until the next reply has been
    generated. When the budget cannot hold the excerpt next to what is pinned, fewer lines are read;
    when not even one line can be held, the excerpt is read without the hold (``held`` False: it is
    fresh text, but older memory is compacted as usual if the budget fills). Nothing is read when
    nothing matches. All or nothing, like every read."""
    check_text(query, "query")
    if not isinstance(max_lines, int) or max_lines < 1:
        raise ValueError(f"max_lines must be an int >= 1 (got {max_lines!r})")
    full = search(session, query, max_lines, context)
    text, hits = full
    while text:
        try:
            receipt = tool_result(session, "recall", text, ratio=1.0, archive=False, hold=True)
            return RecallResult(query=query, hits=hits, text=text, receipt=receipt)
        except PinRefused:  # the hold was refused before anything was read: try fewer lines
            if max_lines == 1 and context == 0:
                break
            max_lines, context = max(1, max_lines // 2), context if max_lines > 1 else 0  # fewer lines fit
            text, hits = search(session, query, max_lines, context)
    else:
        return RecallResult(query=query)  # nothing matches: nothing read
    # not one line can be held: read the whole excerpt as fresh text, without the hold
    text, hits = full
    receipt = tool_result(session, "recall", text, ratio=1.0, archive=False, hold=False)
    return RecallResult(query=query, hits=hits, text=text, receipt=receipt, held=False)
