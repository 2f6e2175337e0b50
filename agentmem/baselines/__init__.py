"""Eviction baselines under the same Method interface as Attention Matching."""

from .window import WindowEviction

__all__ = ["WindowEviction"]
