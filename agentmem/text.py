"""Incremental detokenization and stop strings for streamed generation."""

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
