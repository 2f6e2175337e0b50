"""WHEN to compact and WHAT: policies, their settings, head budgets and the shipped presets.

``config``: the settings (pydantic); ``planner``: the policies that turn a full budget or a
``compact(ratio)`` into a plan, and the one place that decides how many entries each (layer, KV
head) keeps; ``head_budgets``: that allocation's arithmetic; ``profiles``: calibrated head
shares (data); ``presets``: policies by name or file.
"""

from .config import AMConfig, H2OConfig, KVzipConfig, SnapKVConfig, SpanConfig, WindowConfig
from .planner import Policy, SpanPolicy, WindowPolicy
from .presets import DEFAULT_POLICY, available_policies, available_presets, resolve_policy

__all__ = [
    "AMConfig",
    "DEFAULT_POLICY",
    "H2OConfig",
    "KVzipConfig",
    "Policy",
    "SnapKVConfig",
    "SpanConfig",
    "SpanPolicy",
    "WindowConfig",
    "WindowPolicy",
    "available_policies",
    "available_presets",
    "resolve_policy",
]
