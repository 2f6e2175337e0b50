"""Eviction baselines under the same Method interface as Attention Matching."""

from .h2o import H2O
from .kvzip import KVzip
from .snapkv import SnapKV
from .window import WindowEviction

__all__ = ["H2O", "KVzip", "SnapKV", "WindowEviction"]
