"""Text in and out: validation of what callers hand us, incremental detokenization, stop strings."""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Decodes only a short window (from ``prefix`` on) and holds text back while it ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD), so multi-byte characters are never split.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a trailing incomplete character) at the end."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


def find_stop(text: str, new_from: int, stops: Sequence[str]) -> int | None:
    """Index in ``text`` where the earliest stop string begins, looking only at matches that
    overlap ``text[new_from:]`` (the part just added); None if there is none."""
    best = None
    for stop in stops:
        if not stop:
            continue
        idx = text.find(stop, max(0, new_from - len(stop) + 1))
        if idx != -1 and (best is None or idx < best):
            best = idx
    return best


def check_text(text, what: str = "text") -> None:
    """A str that can be written as UTF-8 (no lone surrogates), else a clear error."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode: {exc.reason} at index {exc.start} ({text[exc.start : exc.end]!r}); "
            "remove or replace that character"
        ) from None


def check_messages(messages) -> None:
    """Chat messages: dicts with a str ``role`` and a str ``content`` (an assistant message with
    ``tool_calls`` may have None), all valid Unicode."""
    if not isinstance(messages, list):
        raise ValueError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat messages are dicts with 'role' and 'content', got {m!r}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"a message's role must be a non-empty str, got {m['role']!r}")
        content = m["content"]
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            continue
        if not isinstance(content, str):
            raise ValueError(
                f"the content of a {m['role']!r} message must be a str, got {type(content).__name__}"
                + (" (None is only allowed for an assistant message with tool_calls)" if content is None else "")
            )
        check_text(content, f"the content of a {m['role']!r} message")
