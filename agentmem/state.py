"""The schema of a session's state (``Session.state()``): its ``session`` fields, parsed and checked.

A state is ``(tensors, meta)``; the file format that stores it is :mod:`agentmem.persist`. Parsing
checks everything before a session changes: token ids within the vocabulary, and the cache, the
transcript and the pins telling one story.
"""

from __future__ import annotations

from array import array

import torch

from .events import Archived, CompactionEvent


def sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix...``, with the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class SessionFields:
    """The python values of a file's ``session`` part and transcript, checked before anything is written."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, vocab: int):
        s = meta["session"]
        ids = tensors["transcript_ids"]
        if ids.dtype != torch.int32 or ids.dim() != 1:
            raise ValueError("transcript_ids must be a 1-d int32 tensor")
        self.transcript = array("i", ids.tolist())
        self.pending = [int(i) for i in s["pending"]]
        if any(not 0 <= i < vocab for i in self.pending) or (
            len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < vocab
        ):
            raise ValueError(f"token ids outside the model's vocabulary [0, {vocab})")
        self.started = bool(s["started"])
        self.messages = list(s["messages"])
        self.chat_text = str(s["chat_text"])
        self.tools = s.get("tools")
        self.latest_turn = tuple(s["latest_turn"]) if s.get("latest_turn") is not None else None
        self.pinned = [(int(a), int(b)) for a, b in s["pinned"]]
        self.archive = [Archived(str(n), int(a), int(b)) for n, a, b in s.get("archive", [])]
        self.held = [(int(a), int(b)) for a, b in s.get("held", [])]
        if any(h not in self.pinned for h in self.held):
            raise ValueError("a held range is not among the pinned ranges")
        self.pin_turn = float(s.get("pin_turn", 0.75))
        if not 0 <= self.pin_turn <= 1:
            raise ValueError(f"pin_turn {self.pin_turn} outside [0, 1]")
        self.auto_recall = s.get("auto_recall", False)
        if not isinstance(self.auto_recall, bool):
            raise ValueError(f"auto_recall must be true or false (got {self.auto_recall!r})")
        self.compactions = [CompactionEvent(**e) for e in s["compactions"]]
        self.rng = tensors["sampler_rng"]
        if self.rng.dtype != torch.uint8:
            raise ValueError("sampler_rng must be a uint8 tensor")


def _check_consistent(tensors: dict[str, torch.Tensor], meta: dict, parsed: SessionFields) -> None:
    """The cache, the transcript and the pins tell one story: every token run through the model is
    in the transcript (pending ones follow), every entry's token index is one of them, every pin
    lies inside the transcript. ValueError otherwise (a file edited, then re-checksummed)."""
    logical = meta["cache"]["logical_length"]
    if not isinstance(logical, int) or logical + len(parsed.pending) != len(parsed.transcript):
        raise ValueError(
            f"the cache has read {logical} tokens and {len(parsed.pending)} are pending, but the transcript "
            f"holds {len(parsed.transcript)}"
        )
    for name, t in tensors.items():
        if name.startswith("cache.layers.") and name.endswith(".tok") and t.numel():
            if int(t.min()) < 0 or int(t.max()) >= logical:
                raise ValueError(f"{name} holds token indices outside [0, {logical})")
    for a, b in parsed.pinned + [(x.start, x.end) for x in parsed.archive]:
        if not 0 <= a <= b <= len(parsed.transcript):
            raise ValueError(f"pinned range ({a}, {b}) lies outside the transcript (0, {len(parsed.transcript)})")


def parse_session(tensors: dict[str, torch.Tensor], meta: dict, vocab: int) -> SessionFields:
    """The session part of a file's state, validated (token ids within ``vocab``, the cache, the
    transcript and the pins consistent); ValueError / KeyError / TypeError otherwise."""
    fields = SessionFields(tensors, meta, vocab)
    _check_consistent(tensors, meta, fields)
    return fields
