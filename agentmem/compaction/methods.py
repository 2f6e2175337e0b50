"""Compaction methods by name: the HOW that a policy's plans are executed with."""

from __future__ import annotations

from ..errors import UnknownPolicyError
from .am import AttentionMatching
from .baselines import H2O, KVzip, SnapKV, WindowEviction
from .plan import Method

_METHODS: dict[str, type] = {
    "window": WindowEviction,
    "am": AttentionMatching,
    "h2o": H2O,
    "snapkv": SnapKV,
    "kvzip": KVzip,
}


def available_methods() -> list[str]:
    return sorted(_METHODS)


def make_method(name: str, **settings) -> Method:
    try:
        cls = _METHODS[name]
    except KeyError:
        raise UnknownPolicyError(
            f"unknown compaction method {name!r}; known: {', '.join(available_methods())}"
        ) from None
    return cls(**settings)
