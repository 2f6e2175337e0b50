"""Reference queries that need the model to run: repeat-prefill and self-study scratch passes.

Both run on the live cache inside the runner's ``scratch`` (rolled back afterwards, the query
buffer untouched) in pieces that fit the free budget, so they never push ``kv_bytes`` past it. A piece
of repeat-prefill is the instruction followed by a stretch of the original text of the spans
being compacted (from the session's transcript, so already-compacted memory is repeated from its
original tokens); only the queries of the repeated text are kept. Both return None when the
budget has no room for a useful pass; the session then falls back to buffered queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .plan import CompactionPlan
from .queries import QueryCollector, QuerySet

if TYPE_CHECKING:
    from ..kv.cache import CompactedCache

REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly.\n\n"
SELF_STUDY_PROMPTS = (
    "\n\nQuestion: What is the text above about? Summarize it.\nAnswer:",
    "\n\nQuestion: List the most important names, numbers and facts in the text above.\nAnswer:",
    "\n\nQuestion: Quote the first lines of the text above.\nAnswer:",
)
_MIN_PIECE = 16
SELF_STUDY_TOKENS = 2048  # the most query tokens self-study keeps
_CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU feature checks


class Runner(Protocol):
    """What a scratch pass needs of the model's owner (the engine implements it)."""

    tokenizer: Any
    transcript_ids: Sequence[int]

    def scratch(
        self, cache: CompactedCache, observer: Callable[[int, torch.Tensor], None] | None = None
    ) -> AbstractContextManager[CompactedCache]:
        """Forwards inside leave no trace on ``cache``; ``observer(layer, query)`` sees the queries."""
        ...

    def forward_chunk(self, cache: CompactedCache, chunk: Sequence[int], keep: str) -> torch.Tensor | None:
        """One model call on ``chunk`` (room already reserved); logits per ``keep``."""
        ...


class _SkipPrefix(QueryCollector):
    """Collector that ignores the first ``skip`` query tokens of each call (the instruction)."""

    skip = 0

    def __call__(self, layer: int, query: torch.Tensor) -> None:
        if query.shape[2] > self.skip:
            super().__call__(layer, query[:, :, self.skip :])


def _span_token_range(cache: CompactedCache, plan: CompactionPlan) -> tuple[int, int] | None:
    lo, hi = None, None
    for request in plan.requests:
        layer = cache.layers[request.layer]
        for h, spans in enumerate(request.heads):
            for s, e, _ in spans:
                if e > s:
                    tok = layer.head("tok", h)[s:e]
                    a, b = int(tok.min().item()), int(tok.max().item()) + 1
                    lo = a if lo is None else min(lo, a)
                    hi = b if hi is None else max(hi, b)
    return None if lo is None else (lo, hi)


def pass_dtype(name: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a scratch pass runs its products in: ``"auto"`` is bf16 for an fp32 model on a
    device with fast bf16 matrix units (CUDA; a CPU with AMX or AVX512-BF16), else the model's."""
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32" or model_dtype != torch.float32:
        return model_dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else model_dtype
    if device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in _CPU_BF16_PROBES):
        return torch.bfloat16
    return model_dtype


def _autocast(cache: CompactedCache, dtype: torch.dtype | None) -> AbstractContextManager:
    """Run a scratch forward's products in ``dtype`` (queries for ranking and fitting need no more)."""
    enabled = dtype is not None and dtype != cache.dtype
    return torch.autocast(cache.device.type, dtype=dtype or torch.bfloat16, enabled=enabled)


def repeat_prefill(
    runner: Runner,
    cache: CompactedCache,
    plan: CompactionPlan,
    max_tokens: int = 2048,
    piece: int = 256,
    dtype: torch.dtype | None = None,
    max_pass_bytes: int | None = None,
) -> QuerySet | None:
    """Queries of the model repeating the spans' original text after an instruction (the forward
    autocast to ``dtype`` when given: bf16 queries cost 0.75x on an AMX CPU, same KL and recall).
    Pieces shrink so that one forward's attention scratch (:func:`pass_bytes`) stays within
    ``max_pass_bytes``; the estimate is returned as the query set's ``pass_bytes``."""
    span = _span_token_range(cache, plan)
    if span is None:
        return None
    instruction = runner.tokenizer(REPEAT_INSTRUCTION, add_special_tokens=False)["input_ids"]
    room = min(piece, cache.free_tokens() - len(instruction), max_tokens)
    longest = max(layer.max_length for layer in cache.layers) + len(instruction)
    if max_pass_bytes is not None:  # n queries over ~longest + room entries
        per_query = pass_bytes(cache.spec, 1, longest + room)
        room = min(room, max_pass_bytes // per_query - len(instruction))
    if room < _MIN_PIECE:
        return None
    text = list(runner.transcript_ids[span[0] : span[1]])
    if len(text) > max_tokens:  # evenly spread pieces over a long span
        n = -(-max_tokens // room)
        starts = torch.linspace(0, len(text) - room, n).round().long().tolist()
        pieces = [text[s : s + room] for s in starts]
    else:
        pieces = [text[s : s + room] for s in range(0, len(text), room)]
    collector = _SkipPrefix(cap=max_tokens, dtype=dtype)
    collector.skip = len(instruction)
    for part in pieces:
        with runner.scratch(cache, collector), _autocast(cache, dtype):
            cache.reserve(len(instruction) + len(part))
            runner.forward_chunk(cache, instruction + part, "none")
    queries = collector.result("repeat-prefill")
    queries.pass_bytes = pass_bytes(cache.spec, len(instruction) + room, longest + room)
    return queries


def pass_bytes(spec, queries: int, keys: int) -> int:
    """Estimate of what one forward of a scratch pass holds beside the queries it keeps: a layer's
    attention scores and weights, fp32, for every query head (``queries`` over ``keys`` entries).
    The larger term at any context worth compacting (the MLP's activations are per token only)."""
    return 2 * 4 * spec.num_q_heads * queries * keys


def self_study(
    runner: Runner,
    cache: CompactedCache,
    answer_tokens: int = 48,
    dtype: torch.dtype | None = None,
    max_tokens: int = SELF_STUDY_TOKENS,
) -> QuerySet | None:
    """Queries of the model answering a few questions about what is in memory (greedy; the
    forward autocast to ``dtype`` when given; at most ``max_tokens`` of them kept, evenly spaced)."""
    if max_tokens < _MIN_PIECE:
        return None
    collector = QueryCollector(cap=max_tokens, dtype=dtype)
    ran = False
    for prompt in SELF_STUDY_PROMPTS:
        ids = runner.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if cache.free_tokens() < len(ids) + _MIN_PIECE:
            continue
        with runner.scratch(cache, collector), _autocast(cache, dtype):
            cache.reserve(len(ids))
            logits = runner.forward_chunk(cache, ids, "last")
            for _ in range(answer_tokens):
                if not cache.fits(1):
                    break
                cache.reserve(1)
                logits = runner.forward_chunk(cache, [int(torch.argmax(logits).item())], "last")
        ran = True
    return collector.result("self-study") if ran else None
