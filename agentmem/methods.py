"""Compaction methods by name (the HOW that a policy's plan names)."""

from __future__ import annotations

from .baselines import WindowEviction
from .compaction.base import Method
from .errors import UnknownPolicyError

_METHODS: dict[str, Method] = {"window": WindowEviction()}


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown compaction method {name!r}; known: {', '.join(sorted(_METHODS))}") from None
